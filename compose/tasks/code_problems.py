"""A small execution-scored Python benchmark: 24 short functions, each a signature, a docstring and asserts.

The problems are written for compose (not taken from HumanEval or MBPP) and sized for models of
0.1-0.5B parameters: one idea each, no imports needed. :func:`pass_at_1` completes each prompt
greedily, cuts the completion at the end of the function body and runs prompt + completion +
asserts in a fresh Python process with a time limit.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    name: str
    prompt: str
    tests: str


def _p(name: str, signature: str, doc: str, tests: str) -> Problem:
    return Problem(name, f'def {signature}:\n    """{doc}"""\n', tests.strip() + "\n")


PROBLEMS: tuple[Problem, ...] = (
    _p("add", "add(a, b)", "Return the sum of a and b.", "assert add(2, 3) == 5\nassert add(-1, 1) == 0"),
    _p("square", "square(x)", "Return x multiplied by itself.", "assert square(4) == 16\nassert square(-3) == 9"),
    _p("is_even", "is_even(n)", "Return True if n is even, else False.", "assert is_even(4)\nassert not is_even(7)"),
    _p("maximum", "maximum(numbers)", "Return the largest number in the list.", "assert maximum([3, 9, 2]) == 9"),
    _p("reverse", "reverse(s)", "Return the string s reversed.", "assert reverse('abc') == 'cba'\nassert reverse('') == ''"),
    _p("count_vowels", "count_vowels(s)", "Return how many characters of s are vowels (a, e, i, o, u).",
       "assert count_vowels('banana') == 3\nassert count_vowels('xyz') == 0"),
    _p("factorial", "factorial(n)", "Return n! for a non-negative integer n.",
       "assert factorial(0) == 1\nassert factorial(5) == 120"),
    _p("fib", "fib(n)", "Return the n-th Fibonacci number, with fib(0) == 0 and fib(1) == 1.",
       "assert fib(0) == 0\nassert fib(1) == 1\nassert fib(10) == 55"),
    _p("is_palindrome", "is_palindrome(s)", "Return True if s reads the same forwards and backwards.",
       "assert is_palindrome('level')\nassert not is_palindrome('hello')"),
    _p("sum_list", "sum_list(numbers)", "Return the sum of the numbers in the list.",
       "assert sum_list([1, 2, 3]) == 6\nassert sum_list([]) == 0"),
    _p("average", "average(numbers)", "Return the arithmetic mean of a non-empty list of numbers.",
       "assert average([1, 2, 3]) == 2\nassert average([5]) == 5"),
    _p("first_word", "first_word(sentence)", "Return the first word of a sentence (words are separated by spaces).",
       "assert first_word('hello big world') == 'hello'"),
    _p("capitalize_words", "capitalize_words(s)", "Return s with the first letter of every word in upper case.",
       "assert capitalize_words('hello world') == 'Hello World'"),
    _p("count_char", "count_char(s, c)", "Return how many times the character c occurs in s.",
       "assert count_char('banana', 'a') == 3\nassert count_char('abc', 'z') == 0"),
    _p("evens", "evens(numbers)", "Return a list of the even numbers in the list, in order.",
       "assert evens([1, 2, 3, 4]) == [2, 4]\nassert evens([]) == []"),
    _p("unique", "unique(items)", "Return the items without duplicates, keeping the first occurrence order.",
       "assert unique([3, 1, 3, 2, 1]) == [3, 1, 2]"),
    _p("celsius", "celsius_to_fahrenheit(c)", "Convert a temperature from degrees Celsius to degrees Fahrenheit.",
       "assert celsius_to_fahrenheit(0) == 32\nassert celsius_to_fahrenheit(100) == 212"),
    _p("gcd", "gcd(a, b)", "Return the greatest common divisor of two positive integers.",
       "assert gcd(12, 18) == 6\nassert gcd(7, 5) == 1"),
    _p("is_prime", "is_prime(n)", "Return True if n is a prime number, else False.",
       "assert is_prime(2)\nassert is_prime(13)\nassert not is_prime(1)\nassert not is_prime(15)"),
    _p("flatten", "flatten(lists)", "Return one list with the elements of a list of lists, in order.",
       "assert flatten([[1, 2], [3], []]) == [1, 2, 3]"),
    _p("word_count", "word_count(s)", "Return the number of words in s (words are separated by whitespace).",
       "assert word_count('a b  c') == 3\nassert word_count('') == 0"),
    _p("clamp", "clamp(x, low, high)", "Return x limited to the range [low, high].",
       "assert clamp(5, 0, 3) == 3\nassert clamp(-1, 0, 3) == 0\nassert clamp(2, 0, 3) == 2"),
    _p("digits_sum", "digits_sum(n)", "Return the sum of the decimal digits of a non-negative integer n.",
       "assert digits_sum(123) == 6\nassert digits_sum(0) == 0"),
    _p("invert_dict", "invert_dict(d)", "Return a new dict mapping each value of d to its key.",
       "assert invert_dict({'a': 1, 'b': 2}) == {1: 'a', 2: 'b'}"),
)  # fmt: skip


def function_body(completion: str) -> str:
    """The completion up to the first line that leaves the function (a non-blank line at column 0)."""
    lines = []
    for line in completion.split("\n"):
        if line.strip() and not line[0].isspace():
            break
        lines.append(line)
    return "\n".join(lines).rstrip() + "\n"


def passes(program: str, timeout: float = 5.0) -> bool:
    """Whether ``program`` exits with status 0 in a fresh interpreter within ``timeout`` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program, encoding="utf-8")
        try:
            done = subprocess.run(
                [sys.executable, "-I", str(path)], cwd=tmp, capture_output=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def pass_at_1(complete, problems=PROBLEMS) -> tuple[float, list[dict]]:
    """Greedy pass@1 (%): ``complete(prompt) -> text`` is called once per problem.

    The prompt given to ``complete`` ends at the docstring's closing quotes, without the line
    break: byte-pair vocabularies hold the line break and the body's indentation as one token, so a
    prompt ending in a bare line break asks the model to continue from a token boundary it rarely
    saw (SmolLM2-135M then answers with prose instead of code).
    """
    rows = []
    for problem in problems:
        prompt = problem.prompt.rstrip("\n")
        body = function_body(complete(prompt))
        ok = passes(prompt + body + "\n\n" + problem.tests)
        rows.append({"name": problem.name, "passed": ok, "completion": body})
    return 100.0 * sum(r["passed"] for r in rows) / len(rows), rows
