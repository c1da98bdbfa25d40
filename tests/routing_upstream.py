"""A scripted OpenAI-compatible upstream for the routing tests (FastAPI, served by real uvicorn on 127.0.0.1).

The upstream `model` name picks the script, so one server plays every specialist:
  answer-K      every choice says "The answer is K."
  small         confident ("The answer is 7." for every choice) unless the prompt contains
                  [unsure]      → choice i says "The answer is i." (agreement 1/n)
                  [pal-broken]  → a PAL program that divides by zero
                  [pal-ok]      → a PAL program returning 6*7
  echo-prompt   answers with the last message's text (shows what the gateway sent)
  fail-500      HTTP 500
  slow          answers after 2 s
`hits[model]` counts requests per upstream model name.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse


def _script(model: str, prompt: str, i: int) -> str:
    if model.startswith("answer-"):
        return f"The answer is {model.split('-', 1)[1]}."
    if model == "small":
        if "[unsure]" in prompt:
            return f"I think it is {i}. The answer is {i}."
        if "[pal-broken]" in prompt:
            return "```python\ndef solution():\n    return 1 / 0\n```"
        if "[pal-ok]" in prompt:
            return "def solution():\n    return 6 * 7"
        return "Counting carefully. The answer is 7."
    if model == "echo-prompt":
        return prompt
    return f"echo from {model}"


def make_upstream() -> tuple[FastAPI, Counter]:
    app = FastAPI()
    hits: Counter = Counter()

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        model = body.get("model", "")
        hits[model] += 1
        if model == "fail-500":
            return JSONResponse({"error": {"message": "scripted failure", "type": "server_error"}}, status_code=500)
        if model == "slow":
            await asyncio.sleep(2.0)
        prompt = body["messages"][-1]["content"]
        n = int(body.get("n") or 1)
        texts = [_script(model, prompt, i) for i in range(n)]
        usage = {"prompt_tokens": 5, "completion_tokens": 4 * n, "total_tokens": 5 + 4 * n}
        if body.get("stream"):
            async def events():
                import json

                for i, t in enumerate(texts):
                    chunk = {"id": "s", "object": "chat.completion.chunk", "created": 0, "model": model,
                             "choices": [{"index": i, "delta": {"content": t}, "finish_reason": "stop"}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return {"id": "s", "object": "chat.completion", "created": 0, "model": model, "usage": usage,
                "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                            for i, t in enumerate(texts)]}

    return app, hits
