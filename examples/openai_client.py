"""Talk to a running dengine server with OpenAI's Python client.

    dengine serve --model llada-reverse --replicas 1 --port 8000      # in another terminal
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1

Diffusion options go in `extra_body`; `max_tokens` is the generation length (the canvas size).
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="llada-reverse")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")
    question = "Add the digits of 48461257"

    reply = client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": question}], max_tokens=128,
        extra_body={"block_length": 32, "cache_policy": "entropy", "stop_at_eos": True},
    )
    print("chat:", reply.choices[0].message.content, f"({reply.choices[0].finish_reason})")
    print("decoded with:", reply.model_extra.get("dengine"))

    print("streamed, one block at a time:")
    stream = client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": question}], max_tokens=128, stream=True,
        extra_body={"block_length": 32, "threshold": 0.9},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(f"  block: {chunk.choices[0].delta.content!r}")

    completion = client.completions.create(model=args.model, prompt="Add the digits of 1234", max_tokens=32)
    print("completion:", repr(completion.choices[0].text))


if __name__ == "__main__":
    main()
