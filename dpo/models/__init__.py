"""Running models: loading policies and tokenizers, the forward on a batch, segment attention, the
decode loop, the export."""
