"""The `openai` teacher: any OpenAI-compatible chat endpoint, through the official `openai.AsyncOpenAI` client.

Retries are ours, not the client's (`max_retries=0`): 429, 5xx, timeouts, dropped connections and malformed response
bodies are retried with exponential backoff and full jitter, honouring `Retry-After` when the server sends it. An
asyncio.Semaphore caps requests in flight at `teacher.concurrency` (the backoff sleep happens outside it, so a
throttled request does not hold a slot). Each prompt is sent once with `n=<samples wanted>`; when a server returns
fewer choices (many ignore `n`), the missing samples are requested one by one.

Fatal errors stop the build with the knob to fix: 401/403 (teacher.api_key_env), 404 (teacher.model), connection
refused after every retry (teacher.base_url). A response still malformed after every retry is non-fatal: its
samples come back with `Completion.error` set (never cached, status no_answer) and the run goes on.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import time

import openai

from reasonlite.config import TeacherConfig
from reasonlite.teachers.base import Completion, OnSample, SampleCollector, TeacherError, TeacherPrompt

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
RETRY_AFTER_CAP_S = 120.0


class _Malformed(Exception):
    """The server answered 2xx with a body we cannot read as a chat completion."""


def retry_after_seconds(headers) -> float | None:
    """Seconds from `Retry-After` (delta seconds or an HTTP date) or `retry-after-ms`; None when absent/unreadable."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return min(float(ms) / 1000, RETRY_AFTER_CAP_S)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), RETRY_AFTER_CAP_S)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return None if parsed is None else min(max(parsed.timestamp() - time.time(), 0.0), RETRY_AFTER_CAP_S)


class OpenAITeacher:
    kind = "openai"

    def __init__(self, cfg: TeacherConfig):
        self.cfg = cfg
        self.model_id = cfg.model
        self.params = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
                       "stop": cfg.stop}
        self.calls = 0
        self.retries = 0
        key = os.environ.get(cfg.api_key_env) or "EMPTY"  # local servers often accept any key
        self.client = openai.AsyncOpenAI(base_url=cfg.base_url, api_key=key, max_retries=0, timeout=cfg.timeout_s,
                                         http_client=_http_client(cfg))

    async def complete(self, prompts: list[TeacherPrompt], samples: list[list[int]],
                       on_sample: OnSample | None = None) -> list[list[Completion]]:
        collect = SampleCollector(samples, on_sample)
        semaphore = asyncio.Semaphore(self.cfg.concurrency)
        tasks = [asyncio.create_task(self._prompt(i, p, wanted, semaphore, collect))
                 for i, (p, wanted) in enumerate(zip(prompts, samples)) if wanted]
        try:
            await asyncio.gather(*tasks)
        finally:  # a fatal error in one prompt cancels the others (already-stored samples stay in the cache)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return collect.ordered()

    async def _prompt(self, i: int, prompt: TeacherPrompt, wanted: list[int], semaphore: asyncio.Semaphore,
                      collect: SampleCollector) -> None:
        got = await self._request(prompt.messages, len(wanted), semaphore)
        for s, completion in zip(wanted, got):
            collect(i, s, completion)
        rest = wanted[len(got):]
        if rest:  # the server returned fewer choices than n: ask for each missing sample on its own
            singles = await asyncio.gather(*(self._request(prompt.messages, 1, semaphore) for _ in rest))
            for s, one in zip(rest, singles):
                collect(i, s, one[0] if one else Completion(text="", error="no choices returned"))

    async def _request(self, messages: list[dict], n: int, semaphore: asyncio.Semaphore) -> list[Completion]:
        cfg = self.cfg
        for attempt in range(cfg.max_retries + 1):
            last = attempt == cfg.max_retries
            try:
                async with semaphore:
                    self.calls += 1
                    response = await self.client.chat.completions.create(
                        model=cfg.model, messages=messages, n=n, temperature=cfg.temperature, top_p=cfg.top_p,
                        max_tokens=cfg.max_tokens, stop=cfg.stop)
                return self._read(response, n)
            except openai.AuthenticationError as e:
                raise TeacherError(f"teacher at {cfg.base_url} rejected the API key (401): set the environment "
                                   f"variable named by teacher.api_key_env ({cfg.api_key_env}) to a valid key. "
                                   f"Server said: {_message(e)}") from None
            except openai.PermissionDeniedError as e:
                raise TeacherError(f"teacher at {cfg.base_url} refused access (403) with the key in "
                                   f"{cfg.api_key_env} (teacher.api_key_env): {_message(e)}") from None
            except openai.NotFoundError as e:
                raise TeacherError(f"teacher model '{cfg.model}' was not found at {cfg.base_url} (404): check "
                                   f"teacher.model (and that teacher.base_url ends in /v1). Server said: "
                                   f"{_message(e)}") from None
            except openai.BadRequestError as e:
                if n > 1:  # some servers refuse n > 1: fall back to one request per sample
                    return [c for one in await asyncio.gather(*(self._request(messages, 1, semaphore)
                                                                for _ in range(n))) for c in one]
                raise TeacherError(f"teacher at {cfg.base_url} refused the request (400): {_message(e)}; check "
                                   "teacher.max_tokens / teacher.stop / teacher.model") from None
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError, _Malformed,
                    json.JSONDecodeError) as e:
                retryable = e
            except openai.APIStatusError as e:
                if e.status_code < 500 and e.status_code != 408:
                    raise TeacherError(f"teacher at {cfg.base_url} answered HTTP {e.status_code}: "
                                       f"{_message(e)}") from None
                retryable = e
            if last:
                break
            self.retries += 1
            response_headers = getattr(getattr(retryable, "response", None), "headers", None)
            delay = retry_after_seconds(response_headers)
            if delay is None:
                delay = random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** attempt))  # full jitter
            await asyncio.sleep(delay)
        if isinstance(retryable, (_Malformed, json.JSONDecodeError)):
            return [Completion(text="", error=f"malformed response: {retryable}") for _ in range(n)]
        if isinstance(retryable, openai.APIConnectionError):
            # aiohttp reports a refused connection as a connect *timeout*; it failed fast, it did not time out
            refused = "Cannot connect to host" in str(retryable.__cause__ or "")
            kind = "timed out" if isinstance(retryable, openai.APITimeoutError) and not refused else "is unreachable"
            raise TeacherError(f"teacher at teacher.base_url={cfg.base_url} {kind} after {cfg.max_retries + 1} "
                               f"attempts ({retryable}); check the server is running, or raise teacher.timeout_s / "
                               "teacher.max_retries") from None
        raise TeacherError(f"teacher at {cfg.base_url} kept failing after {cfg.max_retries + 1} attempts: "
                           f"{_message(retryable)}; lower teacher.concurrency or raise teacher.max_retries") from None

    @staticmethod
    def _read(response, n: int) -> list[Completion]:
        choices = getattr(response, "choices", None)
        if not isinstance(choices, list):
            raise _Malformed(f"expected a chat completion, got {type(response).__name__}")
        usage = getattr(response, "usage", None)
        prompt_tokens = getattr(usage, "prompt_tokens", None)
        out = []
        for choice in sorted(choices, key=lambda c: getattr(c, "index", 0) or 0)[:n]:
            message = getattr(choice, "message", None)
            content = getattr(message, "content", None)
            if not isinstance(content, str):
                # a choice without text is an empty reply, not an error to cache: mark it so it is asked again
                out.append(Completion(text="", error="choice without message content"))
                continue
            out.append(Completion(text=content, prompt_tokens=prompt_tokens, finish_reason=choice.finish_reason,
                                  completion_tokens=None))
        if usage is not None and getattr(usage, "completion_tokens", None) and out:
            # usage is per response; split the completion tokens evenly across the choices it covers
            share = usage.completion_tokens // len(out)
            for c in out:
                c.completion_tokens = share
        return out


def _message(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(e)


def _http_client(cfg: TeacherConfig):
    """The openai SDK's aiohttp-backed client (openai[aiohttp]) when asked for and installed; None = its httpx default.
    """
    if cfg.transport != "aiohttp":
        return None
    try:
        return openai.DefaultAioHttpClient(timeout=cfg.timeout_s)
    except (ImportError, RuntimeError):
        return None
