"""Embedded corpus: three labelled domains available without network (issue: "Data on `datasets`").

- math: generated arithmetic/algebra problems with worked answers, deterministic from `embedded_seed`;
- code: the running interpreter's standard-library `.py` sources, sorted by name and capped;
- prose: documentation bundled with the interpreter: the pydoc topics (`pydoc_data.topics`), then
  module, class and function docstrings read with `ast` (no stdlib module is imported, so nothing runs).

The corpus depends only on the config knobs and on the interpreter; its content hash keys every cache.
"""

import ast
import math
import random
import sysconfig
from fractions import Fraction
from pathlib import Path

from .config import DataConfig

MATH_DOMAIN = "math"
CODE_DOMAIN = "code"
PROSE_DOMAIN = "prose"
EMBEDDED_DOMAINS = (MATH_DOMAIN, CODE_DOMAIN, PROSE_DOMAIN)

# Machine-specific build variables, not source anyone wrote.
_SKIPPED_STDLIB_PREFIXES = ("_sysconfigdata",)


def embedded_documents(cfg: DataConfig) -> dict[str, list[str]]:
    """Columns {"text": [...], "domain": [...]} of the embedded corpus: math, then code, then prose."""
    texts: list[str] = []
    domains: list[str] = []
    for domain, domain_texts in (
        (MATH_DOMAIN, math_problems(cfg.embedded_math_problems, cfg.embedded_seed)),
        (CODE_DOMAIN, stdlib_sources(cfg.embedded_code_max_files, cfg.embedded_code_max_chars,
                                     cfg.embedded_code_max_file_chars)),
        (PROSE_DOMAIN, interpreter_prose(cfg.embedded_prose_max_chars)),
    ):
        texts.extend(domain_texts)
        domains.extend([domain] * len(domain_texts))
    return {"text": texts, "domain": domains}


# ----------------------------------------------------------------------------------------------- math


def math_problems(count: int, seed: int) -> list[str]:
    """`count` problems with worked solutions; the same (count, seed) always gives the same list."""
    rng = random.Random(seed)
    generators = (_multiplication, _add_subtract, _linear_equation, _fraction_sum, _order_of_operations,
                  _percentage, _division_with_remainder, _quadratic, _gcd_lcm, _word_problem)
    return [generators[rng.randrange(len(generators))](rng) for _ in range(count)]


def _signed(value: int) -> str:
    return f"+ {value}" if value >= 0 else f"- {-value}"


def _multiplication(rng: random.Random) -> str:
    a, b = rng.randint(12, 999), rng.randint(12, 99)
    tens, ones = b - b % 10, b % 10
    return (f"Problem: Compute {a} × {b}.\n"
            f"Solution: Split {b} into {tens} + {ones}.\n"
            f"{a} × {tens} = {a * tens}\n"
            f"{a} × {ones} = {a * ones}\n"
            f"{a * tens} + {a * ones} = {a * b}\n"
            f"Answer: {a * b}")


def _add_subtract(rng: random.Random) -> str:
    a, b, c = rng.randint(100, 9999), rng.randint(100, 9999), rng.randint(1, 999)
    return (f"Problem: Compute {a} + {b} - {c}.\n"
            f"Solution: First add: {a} + {b} = {a + b}.\n"
            f"Then subtract: {a + b} - {c} = {a + b - c}.\n"
            f"Answer: {a + b - c}")


def _linear_equation(rng: random.Random) -> str:
    x = rng.randint(-20, 20)
    a = rng.choice([n for n in range(-9, 10) if n not in (0, 1)])
    b = rng.randint(-50, 50)
    c = a * x + b
    return (f"Problem: Solve for x: {a}x {_signed(b)} = {c}.\n"
            f"Solution: Subtract {b} from both sides: {a}x = {c - b}.\n"
            f"Divide both sides by {a}: x = {x}.\n"
            f"Check: {a} · {x} {_signed(b)} = {a * x + b}.\n"
            f"Answer: x = {x}")


def _fraction_sum(rng: random.Random) -> str:
    a, b = rng.randint(1, 9), rng.randint(2, 12)
    c, d = rng.randint(1, 9), rng.randint(2, 12)
    common = math.lcm(b, d)
    numerator = a * (common // b) + c * (common // d)
    total = Fraction(a, b) + Fraction(c, d)
    lines = [f"Problem: Add {a}/{b} + {c}/{d}.",
             f"Solution: The least common denominator of {b} and {d} is {common}.",
             f"{a}/{b} = {a * (common // b)}/{common} and {c}/{d} = {c * (common // d)}/{common}.",
             f"Sum: {numerator}/{common}."]
    if total.denominator != common:
        divisor = math.gcd(numerator, common)
        lines.append(f"Divide numerator and denominator by {divisor}: {total.numerator}/{total.denominator}.")
    lines.append(f"Answer: {total.numerator}/{total.denominator}" if total.denominator != 1
                 else f"Answer: {total.numerator}")
    return "\n".join(lines)


def _order_of_operations(rng: random.Random) -> str:
    a, b, c, d = (rng.randint(2, 30) for _ in range(4))
    return (f"Problem: Evaluate {a} + {b} × {c} - {d}.\n"
            f"Solution: Multiplication comes first: {b} × {c} = {b * c}.\n"
            f"Then left to right: {a} + {b * c} = {a + b * c}, and {a + b * c} - {d} = {a + b * c - d}.\n"
            f"Answer: {a + b * c - d}")


def _percentage(rng: random.Random) -> str:
    percent = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 75])
    base = rng.randint(2, 80) * 20
    result = Fraction(base * percent, 100)
    shown = str(result.numerator) if result.denominator == 1 else f"{float(result):g}"
    return (f"Problem: What is {percent}% of {base}?\n"
            f"Solution: {percent}% means {percent}/100, so compute {base} × {percent} / 100.\n"
            f"{base} × {percent} = {base * percent}, and {base * percent} / 100 = {shown}.\n"
            f"Answer: {shown}")


def _division_with_remainder(rng: random.Random) -> str:
    divisor = rng.randint(3, 47)
    quotient, remainder = rng.randint(5, 300), rng.randint(0, divisor - 1)
    dividend = divisor * quotient + remainder
    return (f"Problem: Divide {dividend} by {divisor} and give the quotient and remainder.\n"
            f"Solution: {divisor} × {quotient} = {divisor * quotient}, which is at most {dividend}, "
            f"while {divisor} × {quotient + 1} = {divisor * (quotient + 1)} is too large.\n"
            f"Remainder: {dividend} - {divisor * quotient} = {remainder}.\n"
            f"Answer: quotient {quotient}, remainder {remainder}")


def _quadratic(rng: random.Random) -> str:
    r1, r2 = rng.randint(-12, 12), rng.randint(-12, 12)
    b, c = -(r1 + r2), r1 * r2
    equation = f"x² {_signed(b)}x {_signed(c)} = 0"
    roots = sorted({r1, r2})
    answer = " or ".join(f"x = {r}" for r in roots)
    return (f"Problem: Solve {equation}.\n"
            f"Solution: Look for two numbers whose product is {c} and whose sum is {-b}: {r1} and {r2}.\n"
            f"So the equation factors as (x {_signed(-r1)})(x {_signed(-r2)}) = 0.\n"
            f"A product is zero when one factor is zero, which gives {answer}.\n"
            f"Answer: {answer}")


def _gcd_lcm(rng: random.Random) -> str:
    factor = rng.randint(2, 15)
    a, b = factor * rng.randint(2, 20), factor * rng.randint(2, 20)
    steps, x, y = [], max(a, b), min(a, b)
    while y:
        steps.append(f"{x} = {x // y} × {y} + {x % y}")
        x, y = y, x % y
    gcd = math.gcd(a, b)
    return (f"Problem: Find the greatest common divisor and least common multiple of {a} and {b}.\n"
            f"Solution: Use the Euclidean algorithm:\n" + "\n".join(steps) + "\n"
            f"The last non-zero remainder is {gcd}, so gcd({a}, {b}) = {gcd}.\n"
            f"lcm({a}, {b}) = {a} × {b} / {gcd} = {a * b // gcd}.\n"
            f"Answer: gcd {gcd}, lcm {a * b // gcd}")


_NAMES = ("Maya", "Omar", "Lena", "Kofi", "Aiko", "Ravi", "Sofia", "Tom")
_ITEMS = (("pens", 3), ("notebooks", 4), ("apples", 2), ("tickets", 12), ("books", 15), ("cups", 5))


def _word_problem(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    item, price = rng.choice(_ITEMS)
    quantity = rng.randint(2, 9)
    cost = price * quantity
    paid = (cost // 10 + 1 + rng.randint(0, 3)) * 10
    return (f"Problem: {item.capitalize()} cost ${price} each. {name} buys {quantity} {item} and pays "
            f"with ${paid}. How much change does {name} get?\n"
            f"Solution: The cost is {quantity} × ${price} = ${cost}.\n"
            f"The change is ${paid} - ${cost} = ${paid - cost}.\n"
            f"Answer: ${paid - cost}")


# ----------------------------------------------------------------------------------------------- code


def stdlib_files() -> list[Path]:
    """Top-level standard-library `.py` files of the running interpreter, sorted by name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [path for path in sorted(stdlib.glob("*.py"))
            if not path.name.startswith(_SKIPPED_STDLIB_PREFIXES)]


def stdlib_sources(max_files: int, max_chars: int, max_file_chars: int) -> list[str]:
    """Whole source files, in name order, skipping files over `max_file_chars`, within both caps."""
    sources: list[str] = []
    used_chars = 0
    for path in stdlib_files():
        if len(sources) >= max_files:
            break
        text = path.read_text(encoding="utf-8")
        if len(text) > max_file_chars or used_chars + len(text) > max_chars:
            continue
        sources.append(text)
        used_chars += len(text)
    return sources


# ---------------------------------------------------------------------------------------------- prose


def interpreter_prose(max_chars: int) -> list[str]:
    """pydoc topics (sorted by name), then one docstring document per stdlib module, within `max_chars`."""
    from pydoc_data.topics import topics

    documents: list[str] = []
    used_chars = 0

    def add(text: str) -> bool:
        nonlocal used_chars
        if used_chars + len(text) > max_chars:
            return False
        documents.append(text)
        used_chars += len(text)
        return True

    for name in sorted(topics):
        add(topics[name].strip())
    for path in stdlib_files():
        text = _module_docstrings(path)
        # Stop at the first module that does not fit: parsing every remaining module would cost seconds.
        if text and not add(text):
            break
    return documents


def _module_docstrings(path: Path) -> str:
    """The module docstring and the docstrings of its public classes, functions and methods."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        parts.append(f"Module {path.stem}\n\n{module_doc}")
    for node in tree.body:
        parts.extend(_definition_docstrings(node, prefix=f"{path.stem}."))
    return "\n\n".join(parts)


def _definition_docstrings(node: ast.AST, prefix: str) -> list[str]:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return []
    if node.name.startswith("_"):
        return []
    parts = []
    doc = ast.get_docstring(node)
    if doc:
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        parts.append(f"{kind} {prefix}{node.name}\n{doc}")
    if isinstance(node, ast.ClassDef):
        for child in node.body:
            parts.extend(_definition_docstrings(child, prefix=f"{prefix}{node.name}."))
    return parts
