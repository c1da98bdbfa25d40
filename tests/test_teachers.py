"""Teachers: the OpenAI-compatible teacher against a real scripted HTTP server, the SQLite cache, the hf teacher."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from teacher_server import ServerState, ThreadedServer, free_port

from reasonlite.config import TeacherConfig
from reasonlite.teachers import CompletionCache, TeacherError, TeacherPrompt, complete_cached, make_teacher


def _prompt(question: str) -> TeacherPrompt:
    return TeacherPrompt([{"role": "system", "content": "be brief"}, {"role": "user", "content": question}])


def _teacher(base_url: str, **kw):
    cfg = TeacherConfig(kind="openai", model=kw.pop("model", "teacher-1"), base_url=base_url,
                        api_key_env="RL_TEST_TEACHER_KEY", **{"max_retries": 3, "timeout_s": 1.0, **kw})
    return make_teacher(cfg)


def _run(teacher, cache, prompts, k):
    async def go():
        try:
            return await complete_cached(teacher, cache, prompts, k)
        finally:
            await teacher.client.close()

    return asyncio.run(go())


def test_openai_teacher_retries_fallbacks_and_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("RL_TEST_TEACHER_KEY", raising=False)
    questions = ["plain", "[[429]] q", "[[500]] q", "[[timeout]] q", "[[malformed]] q", "[[fewer]] q", "[[empty]] q"]
    state = ServerState(script={q: [f"{q} -> The answer is {i}.", f"{q} -> The answer is {i + 1}."]
                                for i, q in enumerate(questions)},
                        retry_after=0.4, slow_s=2.5)
    cache = CompletionCache(tmp_path / "cache.sqlite")
    k = 2
    with ThreadedServer(state) as server:
        results, stats = _run(_teacher(server.base_url), cache, [_prompt(q) for q in questions], k)
        by_q = dict(zip(questions, results))
        assert [c.text for c in by_q["plain"]] == ["plain -> The answer is 0.", "plain -> The answer is 1."]
        for q in questions[1:5]:  # each failed once, then was retried to success
            assert all(c.error is None and c.text.startswith(q) for c in by_q[q]), q
            assert state.attempts[q] >= 2
        # Retry-After was honoured: the retry came no sooner than the server asked
        t = state.attempt_times["[[429]] q"]
        assert t[1] - t[0] >= 0.4 - 0.02
        # the server ignored n for [[fewer]]: the missing sample was requested on its own
        assert state.attempts["[[fewer]] q"] == 2 and all(c.error is None for c in by_q["[[fewer]] q"])
        # a choice without content is not a completion: reported as an error, never cached
        assert by_q["[[empty]] q"][0].error is not None and stats.teacher_errors == 1
        assert stats.hits == 0 and stats.misses == len(questions) * k
        assert len(cache) == len(questions) * k - 1

        served_before = dict(state.served)
        requests_before = state.requests
        results2, stats2 = _run(_teacher(server.base_url), cache, [_prompt(q) for q in questions], k)
        # the re-run pays only for the one sample that was never stored
        assert state.requests == requests_before + 1 and stats2.calls == 1
        assert stats2.hits == len(questions) * k - 1 and stats2.misses == 1
        assert stats2.tokens_saved > 0 and stats2.tokens_counted_with == "teacher-reported usage"
        assert [c.text for c in results2[0]] == [c.text for c in results[0]]
        assert all(c.cached for c in results2[0])
        assert state.served["plain"] == served_before["plain"]
    # every stored row is a complete completion
    rows = sqlite3.connect(tmp_path / "cache.sqlite").execute("SELECT text FROM completions").fetchall()
    assert rows and all(isinstance(r[0], str) and r[0] for r in rows)


def test_openai_teacher_malformed_after_all_retries_is_not_fatal(tmp_path):
    state = ServerState(script={"[[malformed]] q": ["The answer is 3."], "ok": ["The answer is 4."]})
    cache = CompletionCache(tmp_path / "cache.sqlite")
    with ThreadedServer(state) as server:
        results, _ = _run(_teacher(server.base_url, max_retries=0), cache,
                              [_prompt("[[malformed]] q"), _prompt("ok")], 1)
    assert results[0][0].error and results[0][0].text == ""
    assert results[1][0].text == "The answer is 4."
    assert len(cache) == 1  # the malformed response left no row


def test_openai_teacher_wrong_key_names_the_env_var(monkeypatch):
    monkeypatch.setenv("RL_TEST_TEACHER_KEY", "wrong-key")
    with ThreadedServer(ServerState(api_key="right-key")) as server, \
            pytest.raises(TeacherError, match="RL_TEST_TEACHER_KEY") as err:
        _run(_teacher(server.base_url), None, [_prompt("q")], 1)
    assert "401" in str(err.value)


def test_openai_teacher_right_key_is_sent(monkeypatch):
    monkeypatch.setenv("RL_TEST_TEACHER_KEY", "right-key")
    with ThreadedServer(ServerState(api_key="right-key", script={"q": ["The answer is 1."]})) as server:
        results, _ = _run(_teacher(server.base_url), None, [_prompt("q")], 1)
    assert results[0][0].text == "The answer is 1."


def test_openai_teacher_unknown_model_names_teacher_model():
    with ThreadedServer(ServerState()) as server, pytest.raises(TeacherError, match="teacher.model") as err:
        _run(_teacher(server.base_url, model="no-such-model"), None, [_prompt("q")], 1)
    assert "no-such-model" in str(err.value) and "404" in str(err.value)


def test_openai_teacher_unreachable_names_base_url():
    base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with pytest.raises(TeacherError, match="unreachable") as err:
        _run(_teacher(base_url, max_retries=1), None, [_prompt("q")], 1)
    assert base_url in str(err.value)


def test_cache_key_separates_samples_params_and_prompts(tmp_path):
    from reasonlite.teachers import cache_key

    m = [{"role": "user", "content": "q"}]
    base = cache_key("openai", "t", m, {"temperature": 0.7}, 0)
    assert base == cache_key("openai", "t", [{"role": "user", "content": "q"}], {"temperature": 0.7}, 0)
    others = {cache_key("openai", "t", m, {"temperature": 0.7}, 1), cache_key("openai", "t", m, {"temperature": 0.2}, 0),
              cache_key("openai", "u", m, {"temperature": 0.7}, 0), cache_key("hf", "t", m, {"temperature": 0.7}, 0),
              cache_key("openai", "t", [{"role": "user", "content": "q2"}], {"temperature": 0.7}, 0)}
    assert base not in others and len(others) == 5


def test_hf_teacher_tiny_random_llama_is_cached(tmp_path):
    from reasonlite.teachers.hf import HFTeacher

    cfg = TeacherConfig(kind="hf", model="tiny-random-llama", max_tokens=8, temperature=0.8, batch_size=4)
    prompts = [_prompt("A pen costs $2. How much do 3 pens cost?"), _prompt("What is 7 + 5?")]
    cache = CompletionCache(tmp_path / "cache.sqlite")
    teacher = HFTeacher(cfg, style="pal", seed=0)
    results, stats = asyncio.run(complete_cached(teacher, cache, prompts, 2))
    assert stats.misses == 4 and stats.calls == 1  # 4 (prompt, sample) pairs fit one batch
    assert all(c.text.startswith("```python\ndef solution():\n") for row in results for c in row)
    assert all(c.completion_tokens and c.completion_tokens <= 8 for row in results for c in row)
    # a second teacher object never loads the model: every sample is a cache hit
    again = HFTeacher(cfg, style="pal", seed=0)
    results2, stats2 = asyncio.run(complete_cached(again, cache, prompts, 2))
    assert stats2.hits == 4 and stats2.calls == 0 and again._model is None
    assert [c.text for row in results2 for c in row] == [c.text for row in results for c in row]
