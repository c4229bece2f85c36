"""The `calculator` tool: exact arithmetic on a Python-syntax expression, evaluated by walking its AST (no eval).

Numbers are exact `Fraction`s (the literal 0.1 is 1/10), so 0.1 + 0.2 is exactly 3/10. Everything outside a small
grammar (names, attributes, other calls, comparisons, strings, ...) is refused with a ValueError naming it. Sizes are
bounded before the work is done, so `10**10**10` fails at once instead of hanging the tool thread.
"""
from __future__ import annotations

import ast
import math
import operator
from decimal import Decimal, Inexact, localcontext
from fractions import Fraction
from typing import Annotated, Callable

import pydantic

MAX_CHARS = 2000
MAX_DEPTH = 200  # AST nesting: a sum of 200 terms is a left-leaning chain of 200 additions
MAX_BITS = 10_000  # numerator and denominator of every value (about 3,000 decimal digits)
MAX_LITERAL_EXPONENT = 1000  # 1e1000 is fine, 1e100000000 is refused before 10**100000000 is built
DECIMAL_DIGITS = 12  # significant digits of the decimal shown next to a fraction

# What a call's `expression` may hold: it starts with a digit, a sign, "(" or a function name and holds only arithmetic
# characters. The schema carries it, so a constrained model cannot write anything else: without it the default
# model opened the string with "}}</tool_call>" or "." and the call failed (docs/performance.md, issue 17). So a
# leading "." or space is refused (".5" is written 0.5), though evaluate() would take it.
EXPRESSION_PATTERN = r"^[0-9a-z(+\-−][0-9A-Za-z_+\-*/%^()., ×÷−]*$"
Expression = Annotated[str, pydantic.Field(pattern=EXPRESSION_PATTERN)]

_TYPOGRAPHY = str.maketrans({"^": "**", "×": "*", "÷": "/", "−": "-"})  # what small models and people type

_BINARY: dict[type[ast.operator], Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_DIVISIONS: dict[type[ast.operator], Callable[[Fraction, Fraction], Fraction]] = {
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


def calculator(expression: Expression) -> str:
    """Exact arithmetic: use it for any calculation instead of doing the math yourself. Python syntax with + - * / // % ** and parentheses (^ also means power); decimals are exact (0.1 + 0.2 is 3/10); functions abs, round, min, max, gcd, lcm, sqrt (exact roots only). Results are integers or fractions with a decimal value.

    Args:
        expression: the arithmetic expression, e.g. "(17 * 3 + 4) / 7" or "2^10". Write numbers without thousands
            separators (1234 or 1_234, not 1,234).
    """
    value = evaluate(expression)
    return format_value(value)


def evaluate(expression: str) -> Fraction:
    """The exact value of an expression; ValueError (or ZeroDivisionError) names what is wrong."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("the expression is empty")
    if len(expression) > MAX_CHARS:
        raise ValueError(f"the expression has {len(expression)} characters; the limit is {MAX_CHARS}")
    source = expression.strip().translate(_TYPOGRAPHY)
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not a valid expression ({exc.msg}): {_excerpt(expression)}") from None
    except (RecursionError, MemoryError):  # the parser's own nesting limit
        raise ValueError(f"the expression is nested too deeply (limit {MAX_DEPTH})") from None
    return _Evaluator(source).eval(tree.body, 0)


def format_value(value: Fraction) -> str:
    """"1024", or "7/3 ≈ 2.33333333333" ("=" where the decimal is exact, as in "1/4 = 0.25")."""
    if value.denominator == 1:
        return str(value.numerator)
    with localcontext() as ctx:
        ctx.prec = DECIMAL_DIGITS
        ctx.traps[Inexact] = False
        ctx.clear_flags()
        decimal = Decimal(value.numerator) / Decimal(value.denominator)
        exact = not ctx.flags[Inexact]
    return f"{value} {'=' if exact else '≈'} {decimal}"


class _Evaluator:
    def __init__(self, source: str):
        self.source = source

    def eval(self, node: ast.AST, depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise ValueError(f"the expression is nested too deeply (limit {MAX_DEPTH})")
        if isinstance(node, ast.Constant):
            return self._number(node)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            value = self.eval(node.operand, depth + 1)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp):
            return self._binary(node, depth)
        if isinstance(node, ast.Call):
            return self._call(node, depth)
        raise ValueError(f"{_describe(node)} is not allowed: only numbers, + - * / // % ** and "
                         f"{', '.join(FUNCTIONS)} are")

    def _number(self, node: ast.Constant) -> Fraction:
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ValueError(f"{node.value!r} is not allowed: only numbers are")
        if isinstance(node.value, int):
            return _checked(Fraction(node.value))
        # The literal's text, not the float: 0.1 is exactly 1/10, not 0.1000000000000000055...
        text = (ast.get_source_segment(self.source, node) or repr(node.value)).replace("_", "")
        literal = Decimal(text)
        if not literal.is_finite() or abs(literal.as_tuple().exponent) > MAX_LITERAL_EXPONENT:
            raise ValueError(f"the number {text} is too large or too small")
        return _checked(Fraction(literal))

    def _binary(self, node: ast.BinOp, depth: int) -> Fraction:
        op = type(node.op)
        if op not in _BINARY and op not in _DIVISIONS and op is not ast.Pow:
            raise ValueError(f"the operator {_describe(node.op)} is not allowed: only + - * / // % ** are")
        left, right = self.eval(node.left, depth + 1), self.eval(node.right, depth + 1)
        if op is ast.Pow:
            return power(left, right)
        if op in _DIVISIONS:
            if right == 0:
                raise ZeroDivisionError(f"division by zero in {ast.get_source_segment(self.source, node)!r}")
            return _checked(_DIVISIONS[op](left, right))
        return _checked(_BINARY[op](left, right))

    def _call(self, node: ast.Call, depth: int) -> Fraction:
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in FUNCTIONS:
            raise ValueError(f"the function {ast.get_source_segment(self.source, node.func)!r} is not allowed: "
                             f"only {', '.join(FUNCTIONS)} are")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise ValueError(f"{name}() takes plain positional arguments only")
        args = [self.eval(a, depth + 1) for a in node.args]
        return _checked(FUNCTIONS[name](*args))


def power(base: Fraction, exponent: Fraction) -> Fraction:
    """base ** exponent, exactly. A fractional exponent p/q is allowed where the q-th root is exact (4 ** 0.5 = 2).
    The result's size is estimated before it is computed: bits(base) * exponent."""
    if exponent.denominator != 1:
        root = _exact_root(base, exponent.denominator)
        return power(root, Fraction(exponent.numerator))
    n = exponent.numerator
    if base == 0 and n < 0:
        raise ZeroDivisionError("0 cannot be raised to a negative power")
    size = max(abs(base.numerator), base.denominator).bit_length() - 1  # a lower bound on bits per factor: 0 for 0, ±1
    if size * abs(n) > MAX_BITS:
        raise ValueError(f"the result of {base} ** {n} would have about {int(size * abs(n) * 0.30103)} digits; "
                         f"the limit is {int(MAX_BITS * 0.30103)}")
    return _checked(base ** n)


def _exact_root(value: Fraction, degree: int) -> Fraction:
    if degree > MAX_BITS:
        raise ValueError(f"a root of degree {degree} is not supported")
    if value < 0 and degree % 2 == 0:
        raise ValueError(f"the {_ordinal(degree)} root of the negative number {value} is not a real number")
    sign = -1 if value < 0 else 1
    num, den = _int_root(abs(value.numerator), degree), _int_root(value.denominator, degree)
    if num is None or den is None:
        raise ValueError(f"the {_ordinal(degree)} root of {value} is irrational: the calculator only gives exact "
                         "results (use the python tool for floating point)")
    return sign * Fraction(num, den)


def _int_root(n: int, degree: int) -> int | None:
    """The integer r with r ** degree == n, or None. Newton's method on integers (exact for any size)."""
    if n < 2:
        return n
    r = 1 << -(-n.bit_length() // degree)  # an upper bound: 2 ** ceil(bits / degree)
    while True:
        smaller = ((degree - 1) * r + n // r ** (degree - 1)) // degree
        if smaller >= r:
            break
        r = smaller
    return r if r ** degree == n else None


def _sqrt(x: Fraction) -> Fraction:
    return _exact_root(x, 2)


def _round(x: Fraction, digits: Fraction | None = None) -> Fraction:
    if digits is None:
        return Fraction(round(x))
    if digits.denominator != 1 or abs(digits) > MAX_LITERAL_EXPONENT:
        raise ValueError(f"round()'s digits must be an integer of at most {MAX_LITERAL_EXPONENT}, got {digits}")
    return round(x, int(digits))  # half to even, like Python's round


def _integers(name: str, values: tuple[Fraction, ...]) -> list[int]:
    if not values or any(v.denominator != 1 for v in values):
        raise ValueError(f"{name}() takes one or more integers, got {', '.join(map(str, values)) or 'none'}")
    return [v.numerator for v in values]


def _at_least_one(name: str, fn: Callable) -> Callable[..., Fraction]:
    def call(*values: Fraction) -> Fraction:
        if not values:
            raise ValueError(f"{name}() needs at least one argument")
        return fn(values)
    return call


def _arity(name: str, fn: Callable, low: int, high: int) -> Callable[..., Fraction]:
    def call(*values: Fraction) -> Fraction:
        if not low <= len(values) <= high:
            count = f"{low}" if low == high else f"{low} or {high}"
            raise ValueError(f"{name}() takes {count} argument(s), got {len(values)}")
        return fn(*values)
    return call


FUNCTIONS: dict[str, Callable[..., Fraction]] = {
    "abs": _arity("abs", abs, 1, 1),
    "round": _arity("round", _round, 1, 2),
    "min": _at_least_one("min", min),
    "max": _at_least_one("max", max),
    "gcd": lambda *v: Fraction(math.gcd(*_integers("gcd", v))),
    "lcm": lambda *v: Fraction(math.lcm(*_integers("lcm", v))),
    "sqrt": _arity("sqrt", _sqrt, 1, 1),
}


def _checked(value: Fraction) -> Fraction:
    if max(abs(value.numerator).bit_length(), value.denominator.bit_length()) > MAX_BITS:
        raise ValueError(f"a value has more than {int(MAX_BITS * 0.30103)} digits: the limit of the calculator")
    return value


def _describe(node: ast.AST) -> str:
    names = {ast.BitXor: "^ (xor)", ast.BitAnd: "&", ast.BitOr: "|", ast.LShift: "<<", ast.RShift: ">>",
             ast.MatMult: "@", ast.Name: "a name", ast.Attribute: "an attribute", ast.Compare: "a comparison",
             ast.BoolOp: "and/or", ast.Tuple: "a comma (write 1234, not 1,234)", ast.List: "a list",
             ast.Subscript: "indexing", ast.Lambda: "lambda", ast.IfExp: "if/else", ast.JoinedStr: "an f-string",
             ast.Invert: "~", ast.Not: "not"}
    if isinstance(node, ast.UnaryOp):
        node = node.op
    label = names.get(type(node), type(node).__name__)
    if isinstance(node, ast.Name):
        label = f"the name {node.id!r}"
    return label


def _excerpt(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _ordinal(n: int) -> str:
    return {2: "square", 3: "cube"}.get(n, f"{n}th")
