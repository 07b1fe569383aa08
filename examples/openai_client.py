"""Talk to a running dengine server with OpenAI's Python client.

    dengine serve --port 8000                       # in another terminal: the embedded llada-sudoku model
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1

With an embedded model it asks the kind of question the model was trained on (its task, from
dengine.tasks) and checks every answer. Diffusion options go in `extra_body`; `max_tokens` is the generation
length (the canvas size). Chat requests apply the model's chat template; /v1/completions sends the prompt as
it is (OpenAI's semantics), so it gets the template applied here first, as the models were trained on chats.

With a real checkpoint folder, serve it and ask anything (nothing is checked then):

    dengine serve --model /models/LLaDA-8B-Instruct --gen-length 256 --block-length 32 --port 8000
    python examples/openai_client.py --question "What is 7 * 8?" --max-tokens 256
"""

from __future__ import annotations

import argparse

from openai import OpenAI

from dengine.assets import EMBEDDED_MODELS
from dengine.tasks import task_of_model
from dengine.tokenizer import load_tokenizer


def main(argv: list[str] | None = None, http_client=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None, help="the served model's name (default: the first it lists)")
    parser.add_argument("--question", default=None, help="ask this instead of the embedded model's task")
    parser.add_argument("--max-tokens", type=int, default=None, help="default: the task's generation length")
    args = parser.parse_args(argv)
    client = OpenAI(base_url=args.base_url, api_key="unused", http_client=http_client)
    model = args.model or client.models.list().data[0].id
    if args.question is not None:
        problems, max_tokens, block = [None], args.max_tokens or 256, 32
    elif model in EMBEDDED_MODELS:
        task = task_of_model(EMBEDDED_MODELS[model])
        problems, max_tokens, block = task.held_out(3), args.max_tokens or task.gen_length, task.block_length
        print(f"{model} was trained on {task.name}: {task.summary}\nanswers: {task.answer_format}\n")
    else:
        parser.error(f"{model} is not an embedded model: pass --question")

    def show(label: str, problem, text: str) -> None:
        verdict = "" if problem is None else ("   (right)" if problem.check(text) else "   (wrong)")
        print(f"{label}: {text}{verdict}")

    for problem in problems:
        question = args.question if problem is None else problem.question
        messages = [{"role": "user", "content": question}]
        print(f"Q: {question}")
        reply = client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens,
            extra_body={"block_length": block, "cache_policy": "entropy", "stop_at_eos": True},
        )
        show("  chat (EntropyCache)", problem, reply.choices[0].message.content)
        dengine = reply.model_extra.get("dengine") or {}
        print(f"  decoded with: {dengine.get('cache_policy')}, {dengine.get('nfe')} forwards")

        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, stream=True,
            extra_body={"block_length": block, "threshold": 0.9},
        )
        blocks = [chunk.choices[0].delta.content for chunk in stream
                  if chunk.choices and chunk.choices[0].delta.content]
        print(f"  streamed, one event per decoded block: {blocks}")
        show("  streamed text (threshold 0.9)", problem, "".join(blocks))

    if model in EMBEDDED_MODELS:  # /v1/completions takes the prompt as it is: render the chat template here
        tokenizer = load_tokenizer(EMBEDDED_MODELS[model])
        problem = problems[0] if args.question is None else None
        question = args.question if problem is None else problem.question
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=False)
        completion = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens)
        show("completion (chat template applied by the client)", problem, completion.choices[0].text)


if __name__ == "__main__":
    main()
