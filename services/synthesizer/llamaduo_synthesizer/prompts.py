"""The generation prompt (after the LlamaDuo paper's synthesis prompt), per-task templates and the reply's schema."""

from __future__ import annotations

from typing import Any

from llamaduo.contract.spec import PROMPT_PLACEHOLDERS, TaskSpec, prompt_template_problem
from llamaduo.data.rows import ChatRow

SCHEMA_NAME = "synthetic_pairs"

SYSTEM = "You write high-quality training data for a language model. You reply with one JSON object and nothing else."

PLACEHOLDERS = PROMPT_PLACEHOLDERS
"""The names a `synthesis.prompt_template` may use, each as `{name}` (the contract checks them on request)."""

DEFAULT_TEMPLATE = """Generate {pairs} new (instruction, response) pairs that are similar in context and structure to \
the example pair below. Each pair consists of a concise instruction followed by an appropriate, detailed response. \
The instruction poses a clear task or question; the response gives a complete answer or solution, in the same style, \
format and length as the example response.

The task is: {task}

Example pair:

<example_instruction>
{instruction}
</example_instruction>

<example_response>
{response}
</example_response>

Write new instructions, not rewordings of the example: keep the task, vary the content, and make every pair \
different from the others. The responses must be accurate and complete.
{focus}
Reply with this JSON object only, with between 1 and {pairs} pairs:
{{"pairs": [{{"instruction": "text", "response": "text"}}, ...]}}"""
"""The paper's prompt: one seed pair per call, asking for a JSON list of new pairs like it."""


class TemplateError(ValueError):
    """A `synthesis.prompt_template` that cannot be rendered; the message names what is wrong."""


def validate_template(template: str) -> None:
    """Raise `TemplateError` unless `template` uses only the known placeholders, each as a plain `{name}`."""
    problem = prompt_template_problem(template)
    if problem:
        raise TemplateError(problem)


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


def task_text(task: TaskSpec, category: str | None) -> str:
    """The `{task}` text: the task's name and description, and the seed's category when it has one."""
    text = task.name + (f". {task.description}" if task.description else "")
    return text + (f"\nThe category of the example is: {category}" if category else "")


def synthesis_messages(
    task: TaskSpec, seed: ChatRow, count: int, *, template: str | None = None, focus: str = ""
) -> list[dict[str, str]]:
    """The chat messages asking for `count` pairs like the train row `seed` (never a test row).

    `template` is a validated `synthesis.prompt_template` (the paper's prompt when None); `focus` is the targeting
    text (empty when untargeted), rendered as its own paragraph in the default prompt.
    """
    values = {
        "task": task_text(task, seed.category),
        "instruction": seed.prompt,
        "response": seed.reference,
        "pairs": str(count),
        "focus": focus,
    }
    if template is None:
        # The default prompt gives the focus a paragraph of its own; a custom template places it where it likes.
        content = DEFAULT_TEMPLATE.format_map({**values, "focus": f"\n{focus}\n" if focus else ""})
    else:
        content = template.format_map(values)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


def prompt_text(messages: list[dict[str, str]]) -> str:
    """Every message's content, joined: what a leak screen looks at before a prompt is sent."""
    return "\n".join(message["content"] for message in messages)
