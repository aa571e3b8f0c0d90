"""The generation prompt (after the LlamaDuo paper's synthesis prompt) and the JSON Schema of its reply."""

from __future__ import annotations

from typing import Any

from llamaduo.contract.spec import TaskSpec
from llamaduo.data.rows import ChatRow

SCHEMA_NAME = "synthetic_pairs"

SYSTEM = "You write high-quality training data for a language model. You reply with one JSON object and nothing else."

TEMPLATE = """Generate {count} new (instruction, response) pairs that are similar in context and structure to the \
example pair below. Each pair consists of a concise instruction followed by an appropriate, detailed response. The \
instruction poses a clear task or question; the response gives a complete answer or solution, in the same style, \
format and length as the example response.

The task is: {task}
{category}
Example pair:

<example_instruction>
{instruction}
</example_instruction>

<example_response>
{response}
</example_response>

Write new instructions, not rewordings of the example: keep the task, vary the content, and make every pair \
different from the others. The responses must be accurate.

Reply with this JSON object only, with between 1 and {count} pairs:
{{"pairs": [{{"instruction": "text", "response": "text"}}, ...]}}"""


def pairs_schema(count: int) -> dict[str, Any]:
    """The JSON Schema of a reply holding 1 to `count` pairs."""
    return {
        "type": "object",
        "properties": {
            "pairs": {
                "type": "array",
                "minItems": 1,
                "maxItems": count,
                "items": {
                    "type": "object",
                    "properties": {"instruction": {"type": "string"}, "response": {"type": "string"}},
                    "required": ["instruction", "response"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["pairs"],
        "additionalProperties": False,
    }


def synthesis_messages(task: TaskSpec, seed: ChatRow, count: int) -> list[dict[str, str]]:
    """The chat messages asking for `count` pairs like the train row `seed` (never a test row)."""
    task_text = task.name + (f". {task.description}" if task.description else "")
    content = TEMPLATE.format(
        count=count,
        task=task_text,
        category=f"The category is: {seed.category}\n" if seed.category else "",
        instruction=seed.prompt,
        response=seed.reference,
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]
