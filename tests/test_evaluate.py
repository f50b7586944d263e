"""`dpo-eval`: win rates and standard errors, the three judges (the API judge against a real HTTP
server started here), sampling with stop strings and whole prompts, end to end on tiny models."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from dpo.commands.cli import CONF_DIR
from dpo.commands.evaluate import choose_prompts, evaluate
from dpo.config.settings import ConfigError
from dpo.evaluation.win_rate import win_rate
from dpo.judges import Comparison, JudgeError, Template
from dpo.judges.local import LocalLMJudge
from dpo.models.completions import sample_texts
from dpo.models.sampling import GenerationConfig, cut_at_stop, generate
from dpo.runtime.io import read_jsonl, write_jsonl

KEY = "sk-test-0123456789abcdef-NEVER-WRITTEN"


def compose_eval(overrides: list[str], out: Path, cache: Path | None = None):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=["data=reviews", "template=positive", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.cache_dir = str(cache or out / "cache")
    return cfg


# --- win rate and standard error --------------------------------------------------------------


def test_win_rate_and_standard_error_by_hand():
    """Prompt 0, both orders: A wins with the policy first (1), A wins with it second (0): 0.5.
    Prompt 1: a tie (0.5) and B with the policy second (1): 0.75. Prompt 2: unreadable, then A with
    the policy second (0): 0. Prompt 3: both unreadable: left out.
    Mean of [0.5, 0.75, 0] = 5/12 = 0.41667; sample variance ((1/12)^2 + (1/3)^2 + (5/12)^2) / 2
    = 0.145833; s.e. = sqrt(0.145833 / 3) = 0.220479. Decided judgments A, A, B, A: 3/4 for A."""
    w = win_rate([
        (0, "A", True), (0, "A", False),
        (1, "tie", True), (1, "B", False),
        (2, None, True), (2, "A", False),
        (3, None, True), (3, None, False),
    ])  # fmt: skip
    assert w.win_rate == pytest.approx(5 / 12) and w.stderr == pytest.approx(0.220479, abs=1e-6)
    assert (w.n, w.judgments, w.parse_failures, w.ties) == (3, 5, 3, 1)
    assert w.position_bias == pytest.approx(0.75)


def test_one_prompt_has_no_standard_error_and_none_has_no_win_rate():
    assert math.isnan(win_rate([(0, "A", True)]).stderr) and win_rate([(0, "A", True)]).win_rate == 1.0
    assert math.isnan(win_rate([(0, None, True)]).win_rate)


@pytest.mark.parametrize(("text", "winner"), [
    ("Summary A is shorter and keeps the point.\nPreferred: A", "A"),
    ("B covers more.\n\nPreferred: \"B\"", "B"),
    ("One sentence.\nB", "B"),
    ("Preferred: **A**.", "A"),
    ("I like both equally.", None),
    ("Preferred: C", None),
    ("Preferred: A or B", None),
    ("", None),
])  # fmt: skip
def test_the_verdict_is_the_letter_on_the_last_line(text, winner):
    assert Template().parse(text) == winner


# --- the API judge against a real HTTP server ---------------------------------------------------


class ScriptedServer(ThreadingHTTPServer):
    """Chat completions: prefers the continuation starting with "good", rejects one starting with
    "bad", answers "weird" ones with no letter; the first ``fail`` requests get 429."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[tuple[str | None, dict]] = []
        self.fail = 0
        self.mode: str | None = None  # misbehave: schema, html, bytes, torn, slow, weird, u2028
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up on a slow answer closes the socket: the late write fails, as it should


class Handler(BaseHTTPRequestHandler):
    server: ScriptedServer

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append((self.headers.get("Authorization"), body))
            fail, self.server.fail = self.server.fail > 0, max(0, self.server.fail - 1)
        if self.path != "/v1/chat/completions" or fail:
            self.send_response(429 if fail else 404)
            self.send_header("Retry-After", "0")
            self.end_headers()
            return
        if self.server.mode in MISBEHAVIOUR:
            return MISBEHAVIOUR[self.server.mode](self)
        user = body["messages"][-1]["content"]  # ours (Continuation) or the paper's templates (Summary, Response)
        a, b = re.search(r"(?:Continuation|Summary|Response) A:\n(.*?)\n\n(?:Continuation|Summary|Response) B:\n"
                         r"(.*?)\n\n(?:Which|FIRST)", user, re.S).groups()  # fmt: skip
        cue = "More helpful:" if "More helpful:" in user else "Preferred:"
        if "weird" in a + b or self.server.mode == "weird":
            content = "Both have their charm."
        elif self.server.mode == "u2028":
            content = "A is warmer\u2028about the film.\nPreferred: A"
        elif a.startswith("good") or b.startswith("bad"):
            content = f"A is warmer about the film.\n{cue} A"
        else:
            content = f"B is warmer about the film.\n{cue} B"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass

    def reply(self, data: bytes, content_type: str = "application/json") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _slow(handler: Handler) -> None:
    time.sleep(2.0)  # longer than the test's judge.timeout_s
    handler.reply(b'{"choices": [{"message": {"content": "Preferred: A"}}]}')


MISBEHAVIOUR = {
    "schema": lambda h: h.reply(b'{"result": {"text": "Preferred: A"}}'),  # another API's schema
    "html": lambda h: h.reply(b"<html><body>502 Bad Gateway</body></html>", "text/html"),
    "bytes": lambda h: h.reply(b"\xff\xfe\x00garbage"),
    "torn": lambda h: h.wfile.write(b"HTTP/1.1 2"),  # a torn status line, then the connection closes
    "slow": _slow,
    "silent": lambda h: time.sleep(5.0),  # accepts the connection and never answers
}


@pytest.fixture
def server():
    s = ScriptedServer()
    thread = threading.Thread(target=s.serve_forever, daemon=True)
    thread.start()
    yield s
    s.shutdown()


def api_overrides(server: ScriptedServer, completions: Path) -> list[str]:
    return ["judge=api", f"judge.base_url={server.url}", "judge.model=scripted", "judge.api_key_env=TEST_JUDGE_KEY",
            "judge.backoff_s=0.01", "judge.max_concurrency=3", "n_prompts=8", "temperatures=[0.0]",
            f"completions={completions}"]  # fmt: skip


def scripted_completions(tmp_path: Path) -> Path:
    """Policy `dpo` at T=0 on the 8 chosen prompts: 5 good, 2 bad, 1 weird (an unreadable verdict)."""
    prompts = choose_prompts(compose_eval(["n_prompts=8"], tmp_path), None)
    kinds = ["good", "bad", "good", "weird", "good", "bad", "good", "good"]
    rows = [{"policy": "dpo", "temperature": 0.0, "prompt": p.text, "completion": f"{k} take {i}"}
            for i, (p, k) in enumerate(zip(prompts, kinds, strict=True))]  # fmt: skip
    return write_jsonl(tmp_path / "given.jsonl", rows)


def test_api_judge_gives_the_scripted_win_rate_retries_caches_and_keeps_the_key_secret(tmp_path, server,
                                                                                      monkeypatch):  # fmt: skip
    """5 wins, 2 losses, 1 unreadable: win rate 5/7 over n = 7 prompts; sample variance
    (5 (2/7)^2 + 2 (5/7)^2) / 6 = 70/294 = 0.238095, s.e. sqrt(0.238095 / 7) = 0.184428."""
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    completions, cache = scripted_completions(tmp_path), tmp_path / "shared_cache"
    server.fail = 1  # the first request gets a 429 and is retried
    results = evaluate(compose_eval(api_overrides(server, completions), tmp_path / "one", cache))
    (row,) = read_jsonl(results, {"win_rate": float})
    assert row["win_rate"] == pytest.approx(5 / 7) and row["stderr"] == pytest.approx(0.184428, abs=1e-6)
    assert (row["n"], row["parse_failures"], row["skipped_prompts"]) == (7, 1, 0)
    assert len(server.requests) == 9  # 8 comparisons + the retried 429
    assert {auth for auth, _ in server.requests} == {f"Bearer {KEY}"}

    judgments = read_jsonl(tmp_path / "one" / "judgments.jsonl", {"order": str, "raw": str})
    assert {j["order"] for j in judgments} == {"policy_first", "baseline_first"}  # both orders were drawn
    for j in judgments:  # the order is undone: a good policy text wins whichever letter it had
        if j["policy_text"].startswith("good"):
            assert j["verdict"] == ("A" if j["order"] == "policy_first" else "B")
            assert j["a" if j["order"] == "policy_first" else "b"] == j["policy_text"]

    evaluate(compose_eval(api_overrides(server, completions), tmp_path / "two", cache))
    assert len(server.requests) == 9  # the rerun is served from the cache
    assert (tmp_path / "two" / "results.jsonl").read_text() == results.read_text()

    for path in [*tmp_path.rglob("*")]:
        if path.is_file():
            assert KEY not in path.read_text(errors="replace"), path


def test_api_judge_honours_max_requests_and_dry_run_and_needs_its_key(tmp_path, server, monkeypatch, caplog):
    completions = scripted_completions(tmp_path)
    overrides = api_overrides(server, completions)
    with pytest.raises(JudgeError, match="TEST_JUDGE_KEY"):
        evaluate(compose_eval(overrides, tmp_path / "nokey"))
    with caplog.at_level("INFO"):  # counting needs no key
        evaluate(compose_eval([*overrides, "dry_run=true"], tmp_path / "dry_nokey"))
    assert "8 judge requests to send" in caplog.text
    caplog.clear()
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    with pytest.raises(JudgeError, match="8 comparisons need a request but judge.max_requests=3"):
        evaluate(compose_eval([*overrides, "judge.max_requests=3"], tmp_path / "capped"))
    with caplog.at_level("INFO"):
        evaluate(compose_eval([*overrides, "dry_run=true"], tmp_path / "dry"))
    assert "8 judge requests to send" in caplog.text
    assert server.requests == [] and not (tmp_path / "dry" / "judgments.jsonl").exists()
    server.fail = 100  # every attempt fails: retries stop at the cap on requests
    with pytest.raises(JudgeError, match="max_requests=8 reached"):
        evaluate(compose_eval([*overrides, "judge.max_requests=8", "judge.max_retries=20"], tmp_path / "r"))
    assert len(server.requests) == 8


def test_api_judge_settings_are_checked_before_anything_runs_and_a_key_typed_as_its_name_is_not_echoed(
    tmp_path, server, caplog
):
    """Issue 23: max_retries=-1, timeout_s<=0 or a base_url without a scheme were retried like outages or
    crashed; a key typed into judge.api_key_env was echoed into the log. All mistakes come at once."""
    secret = "sk-live-0123456789abcdef"
    bad = ["judge.base_url=localhost:8000/v1", "judge.timeout_s=0", "judge.max_retries=-1",
           f"judge.api_key_env={secret}", "judge.max_run_s=-5", "judge.orders=sideways"]  # fmt: skip
    with caplog.at_level("INFO"), pytest.raises(ConfigError) as error:
        evaluate(compose_eval([*api_overrides(server, scripted_completions(tmp_path)), *bad], tmp_path / "bad"))
    for key in ("base_url", "timeout_s=0.0 must be > 0", "max_retries=-1 must be >= 0", "api_key_env must name",
                "max_run_s=-5.0 must be > 0", "orders='sideways'"):  # fmt: skip
        assert key in str(error.value)
    assert secret not in str(error.value) + caplog.text and server.requests == []


@pytest.mark.parametrize(("mode", "reason"), [
    ("schema", r"malformed answer, not a chat completion: b'\{\"result\": "),
    ("html", r"malformed answer, not a chat completion: b'<html><body>502"),
    ("bytes", r"malformed answer, not a chat completion: b'\\xff\\xfe"),
    ("torn", r"(BadStatusLine|RemoteDisconnected)"),
    ("slow", r"gave no answer within judge.timeout_s=0.5 twice in a row"),
])  # fmt: skip
def test_a_misbehaving_endpoint_is_a_named_failure_never_cached_and_a_fixed_one_is_asked_again(
    tmp_path, server, monkeypatch, mode, reason
):
    """Issue 23: a 200 with another JSON schema was cached and gave a NaN win rate with exit 0 (and the
    rerun after the fix sent nothing); an HTML body, non-UTF-8 bytes or a torn status line were raw
    tracebacks; a trickling server was not bounded. Now each is a retried failure naming the URL and
    its first bytes, nothing of it is cached, and once the endpoint answers the same command judges."""
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    completions, cache = scripted_completions(tmp_path), tmp_path / "cache"
    overrides = [*api_overrides(server, completions), "judge.max_retries=1", "judge.timeout_s=0.5"]
    server.mode = mode
    started = time.monotonic()
    failed = rf"{server.url}/chat/completions (still failing after 1 retries \(|){reason}"
    with pytest.raises(JudgeError, match=failed):
        evaluate(compose_eval(overrides, tmp_path / "broken", cache))
    assert time.monotonic() - started < 30
    assert not (cache / "judgments" / "api.jsonl").exists() or not (cache / "judgments" / "api.jsonl").read_text()
    server.mode = None
    (row,) = read_jsonl(evaluate(compose_eval(overrides, tmp_path / "fixed", cache)), {"win_rate": float})
    assert row["win_rate"] == pytest.approx(5 / 7)


def test_a_server_that_accepts_and_never_answers_ends_the_run_in_two_timeouts(tmp_path, server, monkeypatch):
    """Issue 23: with the default retries a silent server took about 9 minutes per request, and the
    queued requests each waited their turn after the first failure. Now a request that times out twice
    in a row ends the run with the cause, nothing in flight is retried and nothing queued starts."""
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    server.mode = "silent"
    overrides = [*api_overrides(server, scripted_completions(tmp_path)), "judge.max_retries=6", "judge.timeout_s=0.3"]
    started = time.monotonic()
    with pytest.raises(JudgeError, match=r"gave no answer within judge.timeout_s=0.3 twice in a row; is the server up"):
        evaluate(compose_eval(overrides, tmp_path / "run"))
    assert time.monotonic() - started < 4  # 2 x 0.3 s and the backoff; the default retries would take 7 x 0.3 s each
    assert len(server.requests) <= 2 * 3  # max_concurrency=3 in flight, each tried twice; the other 5 never sent


def test_a_run_past_max_run_s_stops_with_what_it_paid_for_cached(tmp_path, server, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    server.mode = "slow"
    overrides = [*api_overrides(server, scripted_completions(tmp_path)), "judge.max_retries=0", "judge.timeout_s=5",
                 "judge.max_run_s=1", "judge.max_concurrency=1"]  # fmt: skip
    with pytest.raises(JudgeError, match=r"judge.max_run_s=1 reached; answers so far are cached"):
        evaluate(compose_eval(overrides, tmp_path / "run"))
    assert len(server.requests) == 1  # the first request (2 s) outlived the run's bound: no second was sent


def test_no_usable_judgment_is_a_named_error_not_a_nan_win_rate(tmp_path, server, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    server.mode = "weird"  # well-formed answers that name no letter
    with pytest.raises(JudgeError, match=r"no usable judgment for dpo at temperature 0: every answer was unreadable"):
        evaluate(compose_eval(api_overrides(server, scripted_completions(tmp_path)), tmp_path / "run"))
    assert len(read_jsonl(tmp_path / "run" / "judgments.jsonl", {"raw": str})) == 8  # what the judge said is kept


def test_a_cached_answer_holding_u2028_is_not_paid_for_again(tmp_path, server, monkeypatch):
    """The judgment cache was read with str.splitlines, which splits at U+2028 inside the JSON string:
    that answer was lost from the cache and requested again on every rerun."""
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    server.mode = "u2028"
    completions, cache = scripted_completions(tmp_path), tmp_path / "cache"
    evaluate(compose_eval(api_overrides(server, completions), tmp_path / "one", cache))
    sent = len(server.requests)
    evaluate(compose_eval(api_overrides(server, completions), tmp_path / "two", cache))
    assert sent == 8 and len(server.requests) == sent


# --- sampling -------------------------------------------------------------------------------


def test_stop_strings_end_an_hh_answer_at_the_next_human_turn():
    answer = " Sure: boil the water first.\n\nHuman: and then?\n\nAssistant: Then add salt."
    assert cut_at_stop(answer, ["\n\nHuman:"]) == " Sure: boil the water first."
    assert cut_at_stop(answer, ["salt", "\n\nHuman:"]) == " Sure: boil the water first."
    assert cut_at_stop("no stop here", ["\n\nHuman:"]) == "no stop here"


def test_generation_stops_at_a_stop_string_and_the_text_is_cut_before_it(tiny_model, bpe_tokenizer):
    """A seeded sample, then the same sample with one of its later tokens as stop string: the text
    ends before the stop string's first occurrence and generation itself ended there."""
    prompts = [bpe_tokenizer("The film was")["input_ids"]]
    torch.manual_seed(0)
    free = generate(tiny_model, prompts, GenerationConfig(max_new_tokens=24), 0, None)[0]
    text = bpe_tokenizer.decode(free, skip_special_tokens=True)
    # a whole-character token (transformers matches stop strings on the decoded end of the sequence)
    k = next(i for i in range(4, 24) if "\ufffd" not in (t := bpe_tokenizer.decode(free[i : i + 1])) and t.strip())
    stop = bpe_tokenizer.decode(free[k : k + 1])
    gen = GenerationConfig(max_new_tokens=24, stop=[stop])
    torch.manual_seed(0)
    assert sample_texts(tiny_model, bpe_tokenizer, ["The film was"], gen).texts == [[text[: text.find(stop)]]]
    torch.manual_seed(0)
    assert len(generate(tiny_model, prompts, gen, 0, None, tokenizer=bpe_tokenizer)[0]) <= k + 1 < len(free)


def test_long_prompts_are_never_cut_and_too_long_ones_are_skipped(tiny_model, bpe_tokenizer):
    """A 100-token post (TL;DR-like) is sampled from whole; one that leaves no room for 8 new tokens
    in the 128 positions is skipped and counted, not cut to fit."""
    words = "the post goes on about the movie and the actors and what went wrong in the second act".split()
    long = " ".join(words * 8)
    ids = bpe_tokenizer(long)["input_ids"]
    fits, too_long = bpe_tokenizer.decode(ids[:100]), bpe_tokenizer.decode(ids[:125])
    gen = GenerationConfig(max_new_tokens=8, temperature=0)
    out = sample_texts(tiny_model, bpe_tokenizer, [fits, too_long], gen)
    assert out.skipped == 1 and out.texts[1] is None
    whole = generate(tiny_model, [bpe_tokenizer(fits)["input_ids"]], gen, 0, None)
    assert len(bpe_tokenizer(fits)["input_ids"]) == 100
    assert out.texts[0] == [bpe_tokenizer.decode(whole[0], skip_special_tokens=True)]


def test_temperature_zero_is_deterministic(tiny_model, bpe_tokenizer):
    gen = GenerationConfig(max_new_tokens=12, temperature=0)
    prompts = ["The film was", "I watched this movie"]
    torch.manual_seed(1)
    first = sample_texts(tiny_model, bpe_tokenizer, prompts, gen, n=2).texts
    torch.manual_seed(2)
    assert sample_texts(tiny_model, bpe_tokenizer, prompts, gen, n=2).texts == first
    assert first[0][0] == first[0][1]


# --- the local LM judge ---------------------------------------------------------------------


def local_judge(model, tokenizer) -> LocalLMJudge:
    return LocalLMJudge(LocalLMJudge.Config(pretrained="unused", batch_size=2), Template(), "", model, tokenizer)


def test_local_judge_follows_the_letter_probabilities_on_a_constructed_model(tiny_model, bpe_tokenizer):
    """With the final layer norm's weight zeroed and its bias set to the sum of one letter's token
    embeddings, every position's logits favour that letter (tied embeddings): the verdict follows."""
    judge = local_judge(tiny_model, bpe_tokenizer)
    comparisons = [Comparison("The film", "was great.", "was dull."), Comparison("A movie", "so-so", "fine")]
    wte = tiny_model.transformer.wte.weight
    with torch.no_grad():
        tiny_model.transformer.ln_f.weight.zero_()
        for letter in ("A", "B"):
            tiny_model.transformer.ln_f.bias.copy_(50 * wte[judge.letters[letter]].sum(0))
            verdicts = judge.judge(comparisons)
            assert [v.winner for v in verdicts] == [letter, letter]
            p = json.loads(verdicts[0].raw)
            assert p[f"p_{letter}"] > p["p_B" if letter == "A" else "p_A"]


def test_local_judge_verdicts_are_the_more_probable_letter_batched_or_not(tiny_model, bpe_tokenizer):
    judge = local_judge(tiny_model, bpe_tokenizer)
    comparisons = [Comparison("The film" + " was" * i, "good" * (i + 1), "bad") for i in range(5)]  # ragged
    batched = judge.letter_logprobs([judge.render(c) for c in comparisons])
    for c, lp, v in zip(comparisons, batched, judge.judge(comparisons), strict=True):
        (alone,) = judge.letter_logprobs([judge.render(c)])
        assert lp == pytest.approx(alone, abs=1e-5)  # left padding changes nothing
        assert v.winner == ("A" if lp[0] > lp[1] else "B")


# --- dpo-eval end to end --------------------------------------------------------------------


def test_dpo_eval_end_to_end_with_the_local_judge_and_a_policy_baseline(tmp_path, exported_tiny):
    """Two policies sampled at two temperatures, one the baseline; the tiny model judges both orders."""
    cfg = compose_eval([f"policies={{sft: {exported_tiny}, dpo: {exported_tiny}}}", "baseline=sft",
                        "temperatures=[0.0,1.0]", "n_prompts=3", "generation.max_new_tokens=6",
                        f"judge.pretrained={exported_tiny}", "wandb=true",
                        "template.user='{prompt} A:{a} B:{b}'"], tmp_path)  # fmt: skip  # within 128 positions
    results = read_jsonl(evaluate(cfg), {"policy": str, "temperature": float, "win_rate": float})
    assert [(r["policy"], r["temperature"]) for r in results] == [("dpo", 0.0), ("dpo", 1.0)]
    greedy = results[0]  # the same model greedy on both sides: identical texts, so every prompt scores 1/2
    assert greedy["win_rate"] == 0.5 and greedy["n"] == 3 and greedy["judgments"] == 6
    judgments = read_jsonl(tmp_path / "judgments.jsonl", {"raw": str})
    assert len(judgments) == 12 and all("p_A" in j["raw"] for j in judgments)
    greedy_verdicts = [(j["prompt_index"], j["order"], j["verdict"]) for j in judgments if j["temperature"] == 0]
    by_prompt = {(i, o): v for i, o, v in greedy_verdicts}  # the same input in both orders: the same letter
    assert all(by_prompt[(i, "policy_first")] == by_prompt[(i, "baseline_first")] for i, _, _ in greedy_verdicts)
    a_won = sum(v == "A" for _, _, v in greedy_verdicts) / 6
    assert greedy["position_bias"] == pytest.approx(a_won)
    assert len(read_jsonl(tmp_path / "completions.jsonl", {"completion": str})) == 12  # 2 policies x 2 T x 3
    for name in ("results.md", "win_rate.png", "eval.meta.json"):
        assert (tmp_path / name).is_file()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_dpo_eval_with_a_reward_judge_against_the_chosen_responses(tmp_path, exported_tiny):
    """The bundled reviews' chosen responses are positive, the tiny model's samples are noise: VADER
    prefers the chosen ones on most prompts."""
    cfg = compose_eval([f"policies={{tiny: {exported_tiny}}}", "judge=reward", "reward@judge.reward=vader",
                        "temperatures=[1.0]", "n_prompts=8", "generation.max_new_tokens=8"], tmp_path)  # fmt: skip
    (row,) = read_jsonl(evaluate(cfg), {"win_rate": float})
    assert row["n"] == 8 and row["win_rate"] < 0.5 and row["judge"]["reward"] == {"name": "vader"}


def test_prompts_come_from_data_or_a_file_and_the_chosen_baseline_needs_data(tmp_path):
    from dpo.commands.evaluate import check
    from dpo.config.settings import ConfigError

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The film was\n\nI watched\nThe film was\nA movie about\n")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=["template=positive", "policies={a: x, b: y}", "n_prompts=2", "baseline=b"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    with pytest.raises(ConfigError, match="data config .* or prompts_file"):
        check(cfg)
    cfg.prompts_file = str(prompts)
    check(cfg)
    chosen = choose_prompts(cfg, None)  # 3 unique prompts, 2 of them (seeded), in file order
    assert len(chosen) == 2 and [p.index for p in chosen] == sorted(p.index for p in chosen)
    assert {p.text for p in chosen} <= {"The film was", "I watched", "A movie about"}
    cfg.baseline = "chosen"
    with pytest.raises(ConfigError, match="baseline=chosen takes the data's preferred responses"):
        check(cfg)


@pytest.mark.parametrize(("data", "template", "stop", "max_new_tokens"), [
    ("tldr_sft", "summary", [], 128),
    ("hh", "dialogue", ["\n\nHuman:"], 256),
    ("tldr_sft", "paper_summary_c", [], 128),
    ("tldr_sft", "paper_summary_s", [], 128),
    ("hh", "paper_dialogue", ["\n\nHuman:"], 256),
    ("cnn_dailymail", "paper_summary_c", [], 128),
    ("tldr_cnndm", "paper_summary_c", [], 128),
])  # fmt: skip
def test_the_paper_evaluations_compose_with_their_data_sets_sampling_settings(tmp_path, data, template, stop,
                                                                             max_new_tokens):  # fmt: skip
    """experiments/tldr and experiments/hh: the API judge config checks out, and sampling takes the
    data set's stop strings and length."""
    from dpo.commands.evaluate import check

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[f"data={data}", f"template={template}", "judge=api",
                                         "judge.model=gpt-4-0314", "policies={sft: a, dpo: b}"])  # fmt: skip
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    check(cfg)
    assert list(cfg.generation.stop) == stop and cfg.generation.max_new_tokens == max_new_tokens
    assert cfg.judge.api_key_env == "OPENAI_API_KEY" and cfg.judge.orders == "random"


def test_a_malformed_completions_file_is_one_error_naming_its_row(tmp_path):
    from dpo.config.settings import ConfigError

    bad = tmp_path / "completions.jsonl"
    bad.write_text('{"policy": "dpo", "temperature": 0, "prompt": "x", "completion": "y"}\n'
                   '{"policy": "dpo", "temperature": "hot", "prompt": "x", "completion": "y"}\n')  # fmt: skip
    cfg = compose_eval([f"completions={bad}", "judge=reward", "reward@judge.reward=vader", "baseline=chosen",
                        "n_prompts=2"], tmp_path / "out")  # fmt: skip
    with pytest.raises(ConfigError, match=r"completions\.jsonl:2: 'temperature' should be"):
        evaluate(cfg)
    assert not (tmp_path / "out" / "judgments.jsonl").exists()


@pytest.mark.parametrize(("template", "cue", "asks"), [
    ("paper_summary_s", "Preferred:", "most important points in the given forum post?"),
    ("paper_summary_c", "Preferred:", "A good summary is both precise and concise."),
    ("paper_dialogue", "More helpful:", "For the following query to a chatbot, which response is more helpful?"),
])  # fmt: skip
def test_the_paper_judge_prompts_fill_in_and_read_the_verdict_line_they_ask_for(template, cue, asks):
    """conf/template/paper_*: App. C.2's prompts word for word. The answer's format line ("Preferred:"
    for TL;DR, "More helpful:" for dialogue) is what the verdict is read from; the format line the
    prompt itself shows is not taken for an answer."""
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[f"template={template}"])
    t = Template(**OmegaConf.to_container(cfg.template, resolve=True))
    assert t.name == template and t.verdict_cue == cue
    (message,) = t.messages(Comparison(prompt=" POST TEXT ", a="first answer", b="second answer"))
    text = message["content"]
    assert asks in text and "POST TEXT\n" in text and "first answer" in text and "second answer" in text
    assert text.index("first answer") < text.index("second answer") and "{" not in text.replace('{"', "")
    assert text.rstrip().endswith(f'{cue} <"A" or "B">')
    assert t.parse(f"Comparison: B is shorter and keeps the point.\n{cue} B") == "B"
    assert t.parse(f'Comparison: A covers more.\n{cue} "A"') == "A"
    assert t.parse(f'{cue} <"A" or "B">') is None  # the prompt's own format line is no verdict


# --- judge-human agreement (agreement=true) --------------------------------------------------------


def test_agreement_with_labels_and_between_labels_by_hand():
    """Comparison 0 (labels x, x, y), judged in both orders: the judge picks x twice: 2/3 with each
    judgment, so 2/3; its labels agree in 1 of 3 pairs. Comparison 1 (label y): one tie, 1/2.
    Comparison 2 (label x): unreadable, left out of the judge's n but its labels (one) never counted
    for human-human. Mean over comparisons: (2/3 + 1/2) / 2; s.e. |2/3 - 1/2| / 2."""
    from dpo.evaluation.agreement import agreement, group_labelled, human_agreement, judge_score

    rows = [("p0", "x", "y"), ("p0", "x", "y"), ("p0", "y", "x"), ("p1", "b", "a"), ("p2", "s", "t"), ("p3", "z", "z")]
    c0, c1, c2 = group_labelled(rows)  # p3's equal responses carry no preference
    assert (c0.x, c0.y, c0.labels) == ("x", "y", ("x", "x", "y")) and c1.labels == ("b",) and c2.labels == ("s",)
    assert human_agreement(c0.labels) == pytest.approx(1 / 3) and human_agreement(c1.labels) is None
    assert judge_score("x", c0.labels) == pytest.approx(2 / 3) and judge_score(None, c0.labels) == 0.5
    # (comparison, verdict, x shown first): A with x first and B with x second both pick x
    result = agreement([(c0, "A", True), (c0, "B", False), (c1, "tie", True), (c2, None, False)])
    assert result.n == 2 and result.judgments == 3 and result.parse_failures == 1 and result.ties == 1
    assert result.judge_human == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert result.judge_human_se == pytest.approx(abs(2 / 3 - 1 / 2) / 2)  # sd (ddof 1) of two / sqrt(2)
    assert result.human_human == pytest.approx(1 / 3) and result.n_multi == 1 and math.isnan(result.human_human_se)
    assert result.position_bias == pytest.approx(1 / 2)  # A won one of the two decided judgments
    flipped = agreement([(c0, "B", True), (c0, "A", False)])  # picks y both times: 1/3
    assert flipped.judge_human == pytest.approx(1 / 3)


def test_dpo_eval_agreement_judges_labelled_comparisons_and_reports_both_agreements(tmp_path):
    """agreement=true on a JSONL of labelled pairs with the VADER judge: comparison 1 has two labels
    that disagree (human-human 0) and comparison 2 three that agree; VADER picks the positive text,
    which the labels name in comparisons 0 and 2 and half of 1's: agreement (1 + 1/2 + 1) / 3.
    Nothing is judged when the config is wrong."""
    pos, neg = "I loved this wonderful, brilliant film.", "I hated this awful, boring film."
    good, bad = "A great and happy story.", "A terrible, sad mess."
    rows = [{"prompt": "Review:", "chosen": pos, "rejected": neg},
            {"prompt": "Another:", "chosen": good, "rejected": bad}, {"prompt": "Another:", "chosen": bad,
                                                                    "rejected": good},
            *[{"prompt": "Third:", "chosen": pos, "rejected": bad}] * 3]  # fmt: skip
    data = write_jsonl(tmp_path / "labelled.jsonl", rows)
    common = ["data=local", f"data.source.splits.train={data}", f"data.source.splits.val={data}", "agreement=true",
              "judge=reward", "reward@judge.reward=vader", "judge.orders=both", "template=positive"]  # fmt: skip
    out = tmp_path / "out"
    result = evaluate(compose_eval(common, out))
    (row,) = read_jsonl(result, {"judge_human": float})
    assert row["n"] == 3 and row["comparisons"] == 3 and row["n_multi"] == 2 and row["judgments"] == 6
    assert row["judge_human"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert row["human_human"] == pytest.approx((0 + 1) / 2) and row["position_bias"] == pytest.approx(0.5)
    table = (out / "agreement.md").read_text()
    assert row["template"] == "positive" and "judge-human agreement" in table and "| reward vader |" in table
    assert len(read_jsonl(out / "judgments.jsonl", {"labels": list, "verdict": str})) == 6
    with pytest.raises(ConfigError, match="agreement=true judges a data config's labelled comparisons"):
        evaluate(compose_eval([*common, "policies={a: x}"], tmp_path / "refused"))
    assert not (tmp_path / "refused" / "judgments.jsonl").exists()


@pytest.mark.parametrize("template", ["paper_summary_c", "paper_dialogue"])
def test_api_judge_agreement_with_the_paper_prompts_against_a_local_server(tmp_path, server, monkeypatch, template):
    """The scripted server prefers the text starting "good", answering in the template's own verdict
    line. Labels: comparisons 0-2 name the good text, comparison 3 the bad one (judge-human 3/4);
    comparison 0 has a second, disagreeing label (its agreement 1/2; human-human 0). A dry run counts
    the requests; the run pays for each comparison once, then the cache serves a rerun."""
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    rows = [{"prompt": f"post {i}", "chosen": f"good summary {i}", "rejected": f"bad summary {i}"} for i in range(3)]
    rows += [{"prompt": "post 0", "chosen": "bad summary 0", "rejected": "good summary 0"},
             {"prompt": "post 3", "chosen": "bad summary 3", "rejected": "good summary 3"}]  # fmt: skip
    data = write_jsonl(tmp_path / "labelled.jsonl", rows)
    overrides = ["data=local", f"data.source.splits.train={data}", f"data.source.splits.val={data}",
                 "agreement=true", f"template={template}", "judge=api", f"judge.base_url={server.url}",
                 "judge.model=scripted", "judge.api_key_env=TEST_JUDGE_KEY", "judge.backoff_s=0.01"]  # fmt: skip
    cache = tmp_path / "cache"
    evaluate(compose_eval([*overrides, "dry_run=true"], tmp_path / "dry", cache))
    assert server.requests == [] and not (tmp_path / "dry" / "agreement.jsonl").exists()
    (row,) = read_jsonl(evaluate(compose_eval(overrides, tmp_path / "one", cache)), {"judge_human": float})
    assert len(server.requests) == 4 and row["n"] == 4 and row["parse_failures"] == 0
    assert row["judge_human"] == pytest.approx((0.5 + 1 + 1 + 0) / 4)
    assert row["human_human"] == 0.0 and row["n_multi"] == 1 and row["template"] == template
    assert row["human_human_se"] is None  # one comparison with several labels: no standard error (null, not NaN)
    assert row["judge"]["model"] == "scripted"
    evaluate(compose_eval(overrides, tmp_path / "two", cache))
    assert len(server.requests) == 4  # served from the cache


# --- win rate over training (callbacks.step_exports + over_training) -----------------------------


def test_step_exports_are_judged_over_training_and_drawn_against_step(tmp_path, caplog):
    """A tiny run with callbacks.step_exports.every_n_steps=2 and 5 steps exports steps 2, 4 and 5
    (the end); each loads as an ordinary model and differs from the last. dpo-eval
    over_training=<run> judges each export as policy step<N> and draws win rate against step. A run
    with no exports, or policies given beside over_training, is refused before anything loads."""
    from transformers import AutoModelForCausalLM

    from conftest import FAST, compose_config, shrink
    from dpo.commands.train import train
    from dpo.evaluation.step_exports import step_exports

    run = tmp_path / "run"
    train(shrink(compose_config([*FAST, "trainer.max_steps=5", "callbacks.samples=null",
                                 "callbacks.step_exports.every_n_steps=2"], run)))  # fmt: skip
    exports = step_exports(run)
    assert list(exports) == [2, 4, 5] and not list((run / "exports").glob(".*.tmp"))
    first, last = (AutoModelForCausalLM.from_pretrained(exports[n]) for n in (2, 5))
    final = AutoModelForCausalLM.from_pretrained(run / "hf")
    assert all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), final.state_dict().values(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), last.state_dict().values(),
                                                       strict=True))  # fmt: skip
    common = ["judge=reward", "reward@judge.reward=vader", "n_prompts=3", "temperatures=[0.0,1.0]",
              "generation.max_new_tokens=4", f"over_training={run}"]  # fmt: skip
    out = tmp_path / "eval"
    rows = read_jsonl(evaluate(compose_eval(common, out)), {"policy": str, "win_rate": float})
    assert sorted({(r["policy"], r["temperature"]) for r in rows}) == [
        (f"step{n:06d}", t) for n in (2, 4, 5) for t in (0.0, 1.0)
    ]
    assert (out / "win_rate_over_training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="no policy exports under"):
        evaluate(compose_eval([*common[:-1], f"over_training={tmp_path / 'nothing'}"], tmp_path / "refused"))
    with pytest.raises(ConfigError, match="judges the run's exports as policies step<N>"):
        evaluate(compose_eval([*common, "policies={step000002: x}"], tmp_path / "refused"))
    base = f"policies={{start: {exports[2]}}}"  # a baseline beside the exports: judged against, not drawn
    rows = read_jsonl(evaluate(compose_eval([*common, base, "baseline=start", "wandb=true"], tmp_path / "vs")),
                      {"policy": str})  # fmt: skip
    assert {r["policy"] for r in rows} == {"step000002", "step000004", "step000005"}
    assert (tmp_path / "vs" / "win_rate_over_training.png").is_file()
    from tests_helpers import wandb_logged

    history = wandb_logged(tmp_path / "vs")["history"]  # the plot of win rate against step and its figure
    assert {"eval/win_rate_over_training_table.path", "eval/win_rate_over_training_figure._type"} <= history
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())


def test_a_few_shot_policy_samples_after_its_prefix_and_the_judge_never_sees_it(tmp_path, exported_tiny, monkeypatch):
    """few_shot={a: 1}: policy a samples after a (prompt + chosen) example of the train split, drawn
    with the seed (two give a longer prefix); b samples the bare prompt; the judge and completions.jsonl hold the bare
    prompt. A file prefix works the same way; an unknown policy or a bad count is refused first."""
    from transformers import AutoTokenizer

    import dpo.commands.evaluate as ev

    seen: dict[int, list[str]] = {}
    real = ev.sample_texts

    def spy(model, tokenizer, prompts, gen, **kw):
        seen.setdefault(len(seen), list(prompts))
        return real(model, tokenizer, prompts, gen, **kw)

    monkeypatch.setattr(ev, "sample_texts", spy)
    common = [f"policies={{a: {exported_tiny}, b: {exported_tiny}}}", "baseline=b", "judge=reward",
              "reward@judge.reward=vader", "n_prompts=3", "temperatures=[0.0]",
              "generation.max_new_tokens=4"]  # fmt: skip
    two = ev.few_shot_prefixes(compose_eval([*common, "few_shot={a: 2}"], tmp_path / "unused"))["a"]
    cfg = compose_eval([*common, "few_shot={a: 1}"], tmp_path / "two")  # one example: the tiny model's 128 positions
    prefix = ev.few_shot_prefixes(cfg)["a"]
    assert prefix == ev.few_shot_prefixes(cfg)["a"] and len(two) > len(prefix) > 20  # drawn with the seed
    assert len(AutoTokenizer.from_pretrained(exported_tiny)(prefix)["input_ids"]) < 100
    evaluate(cfg)
    with_prefix, bare = seen[0], seen[1]  # a first, then the baseline b
    assert all(p.startswith(prefix) for p in with_prefix) and [p[len(prefix):] for p in with_prefix] == bare
    judged = read_jsonl(tmp_path / "two" / "judgments.jsonl", {"prompt": str})
    assert {j["prompt"] for j in judged} <= set(bare) and not any(prefix in j["prompt"] for j in judged)
    assert json.loads((tmp_path / "two" / "eval.meta.json").read_text())["few_shot"] == {"a": 1}
    (tmp_path / "prefix.txt").write_text("Example: a fine film.\n")
    seen.clear()
    evaluate(compose_eval([*common, f"few_shot={{a: {tmp_path / 'prefix.txt'}}}"], tmp_path / "file"))
    assert all(p.startswith("Example: a fine film.\n") for p in seen[0])
    for bad, match in (("{c: 2}", "no policy 'c'"), ("{a: 0}", "a number of examples"),
                       (f"{{a: {tmp_path / 'none.txt'}}}", "no such file")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            evaluate(compose_eval([*common, f"few_shot={bad}"], tmp_path / "refused"))


def test_agreement_on_the_tldr_comparisons_groups_the_workers_labels_of_one_pair(tmp_path):
    """data=tldr_cnndm on the comparisons fixture's news rows: cnn_2 was labelled by two workers who
    disagree (one comparison, human-human 0), cnn_1 by one; the judge's agreement on cnn_2 is 1/2
    whichever summary it picks."""
    fixture = Path(__file__).parent / "fixtures" / "tldr"
    cfg = compose_eval(["data=tldr_cnndm", f"data.source.path={fixture}", "agreement=true", "judge=reward",
                        "reward@judge.reward=vader", "template=paper_summary_c"], tmp_path)  # fmt: skip
    (row,) = read_jsonl(evaluate(cfg), {"judge_human": float})
    assert row["comparisons"] == 2 and row["n_multi"] == 1 and row["human_human"] == 0.0
    judged = {j["x"]: j for j in read_jsonl(tmp_path / "judgments.jsonl", {"labels": list})}
    assert sorted(len(j["labels"]) for j in judged.values()) == [1, 2]


def test_a_best_of_n_stage_samples_the_prompts_dpo_eval_chose_and_is_judged_like_a_policy(tmp_path, exported_tiny):
    """experiments/hh/run.sh and tldr/run.sh's Best-of-N stage on a tiny stand-in: dpo-eval writes
    the prompts it chose (prompts.jsonl); dpo-sample takes them as prompts.file, dpo-score and
    dpo-best-of-n pick per N (completions=), and dpo-eval judges the picks as policies best_of_<N>
    on exactly those prompts, none skipped."""
    from omegaconf import OmegaConf

    from dpo.commands.best_of_n import run as best_of_n
    from dpo.commands.sample import sample
    from dpo.commands.score import score

    judge = ["judge=reward", "reward@judge.reward=vader", "n_prompts=3", "temperatures=[1.0]",
             "generation.max_new_tokens=4"]  # fmt: skip
    evaluate(compose_eval([*judge, f"policies={{tiny: {exported_tiny}}}", "dry_run=true"], tmp_path / "eval"))
    chosen = read_jsonl(tmp_path / "eval" / "prompts.jsonl", {"prompt": str, "prompt_index": int})
    assert len(chosen) == 3
    paths = {"cache_dir": str(tmp_path / "cache")}
    model = {"pretrained": exported_tiny, "revision": None, "dtype": "float32", "trust_remote_code": False,
             "tokenizer": {"pretrained": None}}  # fmt: skip
    samples = sample(OmegaConf.create({
        "paths": paths, "seed": 0, "model": model, "n": 2, "batch_size": 8,
        "generation": {"max_new_tokens": 4, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
        "prompts": {"file": str(tmp_path / "eval" / "prompts.jsonl"), "field": "prompt", "split": "train",
                    "max_prompts": None},
        "output": str(tmp_path / "bon" / "samples.jsonl"),
    }))  # fmt: skip
    out = str(tmp_path / "bon" / "s.jsonl")
    scored = score(OmegaConf.create({"paths": paths, "input": str(samples), "include_prompt": True, "batch_size": 8,
                                     "output": out, "reward": {"name": "vader"}}))  # fmt: skip
    best_of_n(OmegaConf.create({"input": str(scored), "ns": [1, 2], "output": str(tmp_path / "bon" / "eval.jsonl"),
                                "completions": str(tmp_path / "bon" / "picks.jsonl")}))  # fmt: skip
    rows = read_jsonl(evaluate(compose_eval([*judge, f"completions={tmp_path / 'bon' / 'picks.jsonl'}"],
                                            tmp_path / "judged")), {"policy": str})  # fmt: skip
    assert sorted(r["policy"] for r in rows) == ["best_of_1", "best_of_2"]
    assert all(r["n"] == 3 and r["skipped_prompts"] == 0 for r in rows)
