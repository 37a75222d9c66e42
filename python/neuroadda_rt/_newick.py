"""A small Newick reader: leaf names and patristic (path-length) distances.

Enough for the trees :func:`neuroadda_rt.synthetic.domain_family` writes (named leaves, branch
lengths, optional internal names and a trailing ``;``). Quoted labels and comments are not
supported; a malformed string raises :class:`~neuroadda_rt.errors.FormatError`.
"""

from __future__ import annotations

import numpy as np

from .errors import FormatError


class _Node:
    __slots__ = ("name", "length", "children", "parent")

    def __init__(self):
        self.name = ""
        self.length = 0.0
        self.children: list[_Node] = []
        self.parent: _Node | None = None


def parse_newick(text: str) -> _Node:
    """Parse a Newick string into a tree of nodes (root returned)."""
    s = text.strip()
    if not s.endswith(";"):
        raise FormatError(f"expected a Newick string ending in ';', got {text[:60]!r}")
    s = s[:-1]
    pos = 0
    root = _Node()
    node = root
    stack: list[_Node] = []

    def read_label(p: int) -> tuple[str, float, int]:
        start = p
        while p < len(s) and s[p] not in ",():":
            p += 1
        name = s[start:p].strip()
        length = 0.0
        if p < len(s) and s[p] == ":":
            p += 1
            start = p
            while p < len(s) and s[p] not in ",()":
                p += 1
            try:
                length = float(s[start:p])
            except ValueError:
                raise FormatError(f"expected a branch length after ':', got {s[start:p]!r}") from None
        return name, length, p

    while pos < len(s):
        c = s[pos]
        if c == "(":
            child = _Node()
            child.parent = node
            node.children.append(child)
            stack.append(node)
            node = child
            pos += 1
        elif c == ",":
            if not stack:
                raise FormatError(f"unbalanced ',' at position {pos} of the Newick string")
            parent = stack[-1]
            child = _Node()
            child.parent = parent
            parent.children.append(child)
            node = child
            pos += 1
        elif c == ")":
            if not stack:
                raise FormatError(f"unbalanced ')' at position {pos} of the Newick string")
            node = stack.pop()
            pos += 1
            node.name, node.length, pos = read_label(pos)
        else:
            node.name, node.length, pos = read_label(pos)
    if stack:
        raise FormatError("unbalanced '(' in the Newick string")
    return root


def leaves(root: _Node) -> list[_Node]:
    out, todo = [], [root]
    while todo:
        n = todo.pop()
        if n.children:
            todo.extend(reversed(n.children))
        else:
            out.append(n)
    return out


def patristic_distances(text: str) -> tuple[list[str], np.ndarray]:
    """Leaf names (in Newick order) and the matrix of path lengths between them.

    Examples
    --------
    >>> names, d = patristic_distances("((a:1,b:2):1,c:4);")
    >>> names, d.tolist()
    (['a', 'b', 'c'], [[0.0, 3.0, 6.0], [3.0, 0.0, 7.0], [6.0, 7.0, 0.0]])
    """
    root = parse_newick(text)
    tips = leaves(root)
    names = [t.name for t in tips]
    if len(set(names)) != len(names) or any(not n for n in names):
        raise FormatError(f"expected unique, non-empty leaf names in the Newick tree, got {names}")

    def ancestors(n: _Node) -> dict[int, float]:
        """id(ancestor) -> distance from n to it (n itself included at 0)."""
        out, d = {}, 0.0
        while n is not None:
            out[id(n)] = d
            d += n.length
            n = n.parent
        return out

    anc = [ancestors(t) for t in tips]
    k = len(tips)
    dist = np.zeros((k, k))
    for i in range(k):
        for j in range(i + 1, k):
            # lowest common ancestor: the shared ancestor nearest to i
            common = [a for a in anc[i] if a in anc[j]]
            dist[i, j] = dist[j, i] = min(anc[i][a] + anc[j][a] for a in common)
    return names, dist
