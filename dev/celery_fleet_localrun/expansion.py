"""Kubernetes' `$(VAR)` expansion for env values, command and args. (pure)

The rules of k8s.io/kubernetes third_party/forked/golang/expansion: `$(NAME)` becomes the value
of NAME when NAME is defined and stays as written when it is not; `$$` is an escaped `$`, so
`$$(NAME)` becomes the literal `$(NAME)`; any other `$` is kept.
"""

from __future__ import annotations

from collections.abc import Mapping


def expand(text: str, variables: Mapping[str, str]) -> str:
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char != "$" or i + 1 >= n:
            out.append(char)
            i += 1
            continue
        following = text[i + 1]
        if following == "$":
            out.append("$")
            i += 2
        elif following == "(":
            close = text.find(")", i + 2)
            if close < 0:
                # An unterminated reference is kept verbatim, as the kubelet does.
                out.append(text[i:])
                break
            name = text[i + 2 : close]
            out.append(variables[name] if name in variables else text[i : close + 1])
            i = close + 1
        else:
            out.append(char)
            i += 1
    return "".join(out)
