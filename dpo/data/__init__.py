"""The data pipeline: sources -> tokenize -> collate -> datamodule."""
