"""Render the devrep Helm chart without a ``helm`` binary (none installs from PyPI, Debian or npm).

``deploy/helm/devrep`` uses a small subset of Go-template syntax on purpose, and this module renders exactly
that subset by translating it to Jinja2:

* ``{{ .Values.a.b }}``, ``{{ .Release.Name }}``, ``{{ .Release.Namespace }}``, ``{{ .Chart.Name }}``,
  ``{{ .Chart.Version }}``, ``{{ .Chart.AppVersion }}``;
* pipelines of the functions in ``FUNCTIONS`` (``toYaml``, ``nindent``, ``indent``, ``quote``, ``default``,
  ``printf``, ``eq``, ``ne``, ``not``, ``and``, ``or``, ``required``, ``int64``, ``int``), e.g.
  ``{{- toYaml .Values.tolerations | nindent 8 }}``;
* ``{{- if PIPELINE }}`` / ``{{- else if PIPELINE }}`` / ``{{- else }}`` / ``{{- end }}``; ``{{/* comments */}}``;
* the ``-`` whitespace trimmers, which Jinja2 has with the same meaning.

Numbers behave as in helm: values are float64, so a large integer prints in exponent form unless piped through
``int64``; the renderer reproduces that, so the chart test catches a missing ``int64``.

Anything else (``range``, ``with``, ``define``/``include``, variables) is refused with a clear error rather
than rendered differently from helm. Values missing from ``values.yaml`` are errors too (helm would print
nothing), so a typo in a template fails the chart test. Output matches ``helm template``'s layout: one
``# Source:`` comment per template and documents separated by ``---``.

    python -m devrep.kube.chart deploy/helm/devrep [--set slots=8] [-f my-values.yaml] [--release NAME]
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import jinja2
import yaml

from ..errors import InvalidArgumentError

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|`[^`]*`|[^\s"`]+')
_PATH = re.compile(r"\.(Values|Release|Chart)((?:\.[A-Za-z_][A-Za-z0-9_]*)*)")


def _as_helm(value: Any) -> Any:
    """Values as helm holds them: every number is a float64 (its YAML is decoded through JSON)."""
    if isinstance(value, dict):
        return {k: _as_helm(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_helm(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _as_json(value: Any) -> Any:
    """Back to what JSON encoding prints: whole floats as integers (``toYaml`` goes through JSON in helm)."""
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_json(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    return value


def _go_float(value: float) -> str:
    """A float64 as Go's ``%v`` prints it: shortest digits, exponent form from 1e+06 up (or below 1e-04).

    This is why ``{{ .Values.bytes }}`` renders 17179869184 as ``1.7179869184e+10``: pipe through ``int64``."""
    if value != value or value in (float("inf"), float("-inf")):
        return {"nan": "NaN", "inf": "+Inf", "-inf": "-Inf"}[repr(value)]
    if value == 0:
        return "0"
    sign, digit_tuple, exp = Decimal(repr(value)).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    assert isinstance(exp, int)
    nd, dp = len(digits), len(digits) + exp
    eprec = nd if 6 > nd >= dp else 6
    x = dp - 1
    prefix = "-" if sign else ""
    if x < -4 or x >= eprec:
        mantissa = digits[0] + ("." + digits[1:] if nd > 1 else "")
        return f"{prefix}{mantissa}e{'-' if x < 0 else '+'}{abs(x):02d}"
    if dp <= 0:
        return f"{prefix}0.{'0' * -dp}{digits}"
    if dp >= nd:
        return prefix + digits + "0" * (dp - nd)
    return f"{prefix}{digits[:dp]}.{digits[dp:]}"


def _to_yaml(value: Any) -> str:
    # Like helm (sigs.k8s.io/yaml): block style, sorted keys, no trailing newline.
    if value is None:
        return "null"
    text = yaml.safe_dump(_as_json(value), default_flow_style=False, sort_keys=True)
    return text.rstrip("\n").removesuffix("\n...")


def _indent(n: int, text: Any) -> str:
    return "\n".join((" " * n + line) if line else line for line in str(text).split("\n"))


def _go_str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _go_float(value)
    return str(value)


def _quote(*values: Any) -> str:
    return " ".join('"' + _go_str(v).replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)


def _default(fallback: Any, value: Any = None) -> Any:
    return value if value else fallback


def _required(message: str, value: Any) -> Any:
    if value is None or value == "":
        raise InvalidArgumentError(f"chart value required: {message}")
    return value


def _printf(fmt: str, *args: Any) -> str:
    return re.sub(r"%v", "%s", fmt) % tuple(_go_str(a) if isinstance(a, bool) else a for a in args)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "toYaml": _to_yaml,
    "nindent": lambda n, text: "\n" + _indent(n, text),
    "indent": _indent,
    "quote": _quote,
    "default": _default,
    "required": _required,
    "int64": lambda v: int(float(v)),
    "int": lambda v: int(float(v)),
    "printf": _printf,
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "not": lambda a: not a,
    "and": lambda *a: all(a),
    "or": lambda *a: any(a),
}


def _operand(token: str, where: str) -> str:
    """One Go-template operand as a Jinja2 expression."""
    if token.startswith('"'):
        return repr(yaml.safe_load(token))  # a YAML double-quoted scalar unescapes like Go
    if token.startswith("`"):
        return repr(token[1:-1])
    if token in ("true", "false"):
        return "True" if token == "true" else "False"
    if token == "nil":
        return "None"
    if re.fullmatch(r"-?\d+(\.\d+)?", token):
        return token
    m = _PATH.fullmatch(token)
    if m:
        return f"__{m.group(1)}" + "".join(f"[{part!r}]" for part in m.group(2).split(".")[1:])
    raise InvalidArgumentError(f"{where}: unsupported operand {token!r} (this renderer knows .Values/.Release/"
                               ".Chart paths, strings, numbers and booleans)")


def _pipeline(text: str, where: str) -> str:
    """``toYaml .Values.x | nindent 8`` -> ``nindent(8, toYaml(__Values['x']))``."""
    expr: str | None = None
    for stage in (s.strip() for s in re.split(r'\|(?=(?:[^"]*"[^"]*")*[^"]*$)', text)):
        tokens = _TOKEN.findall(stage)
        if not tokens:
            raise InvalidArgumentError(f"{where}: empty pipeline stage in {text!r}")
        head, args = tokens[0], [_operand(t, where) for t in tokens[1:]]
        if head in FUNCTIONS:
            expr = f"{head}({', '.join(args + ([expr] if expr is not None else []))})"
        elif expr is None and not args:
            expr = _operand(head, where)
        else:
            raise InvalidArgumentError(f"{where}: unsupported function {head!r} in {text!r}")
    assert expr is not None
    return expr


def translate(source: str, where: str = "template") -> str:
    """A template in the supported Go-template subset as Jinja2 source."""
    out: list[str] = []
    stack: list[str] = []
    pos = 0
    for m in _ACTION.finditer(source):
        out.append(source[pos:m.start()].replace("{#", "{{ '{#' }}"))
        pos = m.end()
        left, body, right = m.group(1), m.group(2), m.group(3)
        line = source.count("\n", 0, m.start()) + 1
        at = f"{where}:{line}"
        if body.startswith("/*"):
            out.append("{#" + left + " " + body[2:-2].replace("#}", "# }") + " " + right + "#}")
            continue
        word = body.split(None, 1)[0] if body else ""
        if word == "if":
            stack.append("if")
            out.append(f"{{%{left} if {_pipeline(body[2:], at)} {right}%}}")
        elif body.startswith("else if "):
            if not stack:
                raise InvalidArgumentError(f"{at}: 'else if' outside an if")
            out.append(f"{{%{left} elif {_pipeline(body[8:], at)} {right}%}}")
        elif body == "else":
            if not stack:
                raise InvalidArgumentError(f"{at}: 'else' outside an if")
            out.append(f"{{%{left} else {right}%}}")
        elif body == "end":
            if not stack:
                raise InvalidArgumentError(f"{at}: 'end' without a matching if")
            stack.pop()
            out.append(f"{{%{left} endif {right}%}}")
        elif word in ("range", "with", "define", "template", "include", "block") or body.startswith("$"):
            raise InvalidArgumentError(f"{at}: {word or body!r} is outside the Go-template subset this chart uses")
        else:
            out.append(f"{{{{{left} {_pipeline(body, at)} {right}}}}}")
    if stack:
        raise InvalidArgumentError(f"{where}: {len(stack)} 'if' without 'end'")
    out.append(source[pos:].replace("{#", "{{ '{#' }}"))
    return "".join(out)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge like helm's values layering: maps merge, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(assignment: str) -> dict[str, Any]:
    """``a.b=value`` (value parsed as YAML, like ``helm --set`` for scalars) -> ``{"a": {"b": value}}``."""
    key, sep, raw = assignment.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise InvalidArgumentError(f"bad --set {assignment!r}: expected key.path=value")
    value: Any = yaml.safe_load(raw) if raw else ""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def render(chart_dir: str | Path, values: dict[str, Any] | None = None, *, release: str = "devrep",
           namespace: str = "devrep") -> list[tuple[str, str]]:
    """(template path, rendered text) for every template, in file-name order."""
    chart_dir = Path(chart_dir)
    chart = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
    merged = _as_helm(merge(yaml.safe_load((chart_dir / "values.yaml").read_text()) or {}, values or {}))
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False, finalize=_go_str)
    env.globals.update(FUNCTIONS)
    context = {
        "__Values": merged,
        "__Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
        "__Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart.get("appVersion", "")},
    }
    out = []
    for path in sorted((chart_dir / "templates").glob("*.yaml")):
        name = f"{chart['name']}/templates/{path.name}"
        try:
            template = env.from_string(translate(path.read_text(), name))
            out.append((name, template.render(context)))
        except jinja2.UndefinedError as e:
            raise InvalidArgumentError(f"{name}: {e} (not in values.yaml)") from e
        except jinja2.TemplateError as e:
            raise InvalidArgumentError(f"{name}: {e}") from e
    return out


def render_text(rendered: list[tuple[str, str]]) -> str:
    """``helm template``-style stream: ``---`` and ``# Source:`` before each non-empty template."""
    parts = []
    for name, text in rendered:
        for doc in re.split(r"^---\s*$", text, flags=re.M):
            if doc.strip():
                parts.append(f"---\n# Source: {name}\n{doc.strip(chr(10))}\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devrep.kube.chart", description="render the devrep Helm chart")
    p.add_argument("chart", nargs="?", default="deploy/helm/devrep")
    p.add_argument("--release", default="devrep")
    p.add_argument("--namespace", default="devrep")
    p.add_argument("-f", "--values", action="append", default=[], help="values file (repeatable)")
    p.add_argument("--set", action="append", default=[], dest="sets", help="key.path=value (repeatable)")
    args = p.parse_args(argv)
    try:
        values: dict[str, Any] = {}
        for path in args.values:
            values = merge(values, yaml.safe_load(Path(path).read_text()) or {})
        for assignment in args.sets:
            values = merge(values, parse_set(assignment))
        sys.stdout.write(render_text(render(args.chart, values, release=args.release, namespace=args.namespace)))
    except (InvalidArgumentError, OSError, yaml.YAMLError) as e:
        print(f"chart: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
