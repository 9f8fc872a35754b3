"""The execution-scored problem set: every problem's asserts pass on a reference solution and fail
on a wrong one, and the completion is cut where the function ends."""

import pytest

from compose.tasks.code_problems import PROBLEMS, function_body, pass_at_1, passes

REFERENCE = {
    "add": "return a + b",
    "square": "return x * x",
    "is_even": "return n % 2 == 0",
    "maximum": "return max(numbers)",
    "reverse": "return s[::-1]",
    "count_vowels": "return sum(ch in 'aeiou' for ch in s)",
    "factorial": "return 1 if n == 0 else n * factorial(n - 1)",
    "fib": "return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "is_palindrome": "return s == s[::-1]",
    "sum_list": "return sum(numbers)",
    "average": "return sum(numbers) / len(numbers)",
    "first_word": "return sentence.split(' ')[0]",
    "capitalize_words": "return ' '.join(w[:1].upper() + w[1:] for w in s.split(' '))",
    "count_char": "return s.count(c)",
    "evens": "return [n for n in numbers if n % 2 == 0]",
    "unique": "return list(dict.fromkeys(items))",
    "celsius": "return c * 9 / 5 + 32",
    "gcd": "return a if b == 0 else gcd(b, a % b)",
    "is_prime": "return n > 1 and all(n % k for k in range(2, int(n ** 0.5) + 1))",
    "flatten": "return [x for xs in lists for x in xs]",
    "word_count": "return len(s.split())",
    "clamp": "return max(low, min(x, high))",
    "digits_sum": "return sum(int(d) for d in str(n))",
    "invert_dict": "return {v: k for k, v in d.items()}",
}


def test_every_problem_has_a_reference_and_unique_name():
    assert sorted(REFERENCE) == sorted(p.name for p in PROBLEMS)


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_reference_passes_and_a_wrong_body_fails(problem):
    assert passes(problem.prompt + "    " + REFERENCE[problem.name] + "\n\n" + problem.tests)
    assert not passes(problem.prompt + "    return None\n\n" + problem.tests)


def test_function_body_stops_at_the_next_top_level_line():
    text = "    x = 1\n\n    return x\n\nprint('side effect')\ndef other():\n"
    assert function_body(text) == "    x = 1\n\n    return x\n"


def test_pass_at_1_scores_completions_and_a_hanging_one_fails():
    answers = {"add": "\n    return a + b\n\nassert False\n", "square": "\n    while True:\n        pass\n"}
    chosen = [p for p in PROBLEMS if p.name in answers]
    by_prompt = {p.prompt.rstrip("\n"): answers[p.name] for p in chosen}  # the prompt stops at the closing quotes
    score, rows = pass_at_1(lambda prompt: by_prompt[prompt], chosen)
    assert rows[0]["passed"] and not rows[1]["passed"] and score == 50.0
