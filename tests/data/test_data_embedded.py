"""Embedded corpus: three labelled domains, deterministic, math answers that are actually right."""

import re
from fractions import Fraction

from train.data import DataConfig, load_documents
from train.data.embedded import EMBEDDED_DOMAINS, embedded_documents, math_problems


def test_three_domains_with_documents(small_corpus):
    corpus = embedded_documents(DataConfig(**small_corpus))
    assert set(corpus["domain"]) == set(EMBEDDED_DOMAINS)
    counts = {domain: corpus["domain"].count(domain) for domain in EMBEDDED_DOMAINS}
    assert counts["math"] == small_corpus["embedded_math_problems"]
    assert 1 <= counts["code"] <= small_corpus["embedded_code_max_files"]
    assert counts["prose"] >= 1
    code = [text for text, domain in zip(corpus["text"], corpus["domain"]) if domain == "code"]
    prose = [text for text, domain in zip(corpus["text"], corpus["domain"]) if domain == "prose"]
    assert sum(map(len, code)) <= small_corpus["embedded_code_max_chars"]
    assert sum(map(len, prose)) <= small_corpus["embedded_prose_max_chars"]
    assert any("def " in text or "import " in text for text in code)
    assert all(text.strip() for text in corpus["text"])


def test_default_corpus_is_a_few_megabytes():
    corpus = embedded_documents(DataConfig())
    total_chars = sum(map(len, corpus["text"]))
    assert 1_000_000 < total_chars < 4_000_000, total_chars


def test_corpus_is_deterministic(small_corpus):
    cfg = DataConfig(**small_corpus)
    assert embedded_documents(cfg) == embedded_documents(cfg)
    assert math_problems(50, seed=3) == math_problems(50, seed=3)
    assert math_problems(50, seed=3) != math_problems(50, seed=4)


def test_embedded_dataset_columns(small_corpus):
    documents = load_documents(DataConfig(**small_corpus))
    assert documents.column_names == ["text", "domain"]
    assert len(documents) == len(embedded_documents(DataConfig(**small_corpus))["text"])


def test_math_answers_are_correct():
    checked = 0
    for problem in math_problems(400, seed=0):
        answer = problem.rsplit("Answer: ", 1)[1]
        if match := re.match(r"Problem: Compute (\d+) × (\d+)\.", problem):
            assert int(answer) == int(match[1]) * int(match[2])
        elif match := re.match(r"Problem: Solve for x: (-?\d+)x ([+-]) (\d+) = (-?\d+)\.", problem):
            a, sign, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
            x = int(answer.removeprefix("x = "))
            assert a * x + (b if sign == "+" else -b) == c
        elif match := re.match(r"Problem: Add (\d+)/(\d+) \+ (\d+)/(\d+)\.", problem):
            assert Fraction(answer) == Fraction(int(match[1]), int(match[2])) + Fraction(int(match[3]), int(match[4]))
        elif match := re.match(r"Problem: Solve x² ([+-]) (\d+)x ([+-]) (\d+) = 0\.", problem):
            b = int(match[2]) * (1 if match[1] == "+" else -1)
            c = int(match[4]) * (1 if match[3] == "+" else -1)
            for root in re.findall(r"x = (-?\d+)", answer):
                assert int(root) ** 2 + b * int(root) + c == 0
        else:
            continue
        checked += 1
    assert checked > 100
