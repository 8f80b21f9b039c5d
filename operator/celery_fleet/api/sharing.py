"""Equal parsed models held once (pure): a thousand pools written from one template parse into a
thousand equal `Autoscaling`, `ReplicaBounds` and `Broker` models; the autoscaler keeps every pool's
spec between polls, so it keeps one of each instead.

Only for models nobody changes after parsing (the autoscaler's copies): a shared model changed in
place would change every pool that holds it.
"""

from __future__ import annotations

import weakref
from typing import Any, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)

# hash -> the model last held with it; an entry goes when no spec holds its model any more.
ModelTable = weakref.WeakValueDictionary[int, BaseModel]


def share_submodels(model: M, table: ModelTable) -> M:
    """`model` with each nested model replaced by an equal one already in `table` (the others are
    added). `model` itself is not shared: it is the caller's (a pool's whole spec)."""
    fields = model.__dict__
    for name, value in fields.items():
        if isinstance(value, BaseModel):
            fields[name] = _shared(value, table)
        elif isinstance(value, list) and any(isinstance(v, BaseModel) for v in value):
            fields[name] = [_shared(v, table) if isinstance(v, BaseModel) else v for v in value]
    return model


def _shared(model: BaseModel, table: ModelTable) -> BaseModel:
    share_submodels(model, table)  # bottom-up: children first, so equal parents hold the same children
    h = hash((type(model), frozenset(model.model_fields_set), *((n, _key(v)) for n, v in model.__dict__.items())))
    found = table.get(h)
    if found is not None and _same(found, model):
        return found
    table[h] = model  # a hash shared by unequal models keeps the newest (the older one is just not shared)
    return model


def _key(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return id(value)  # already shared: equal children are the same object
    if isinstance(value, list | tuple):
        return ("[", *map(_key, value))
    if isinstance(value, dict):
        return ("{", *((k, _key(v)) for k, v in value.items()))
    if isinstance(value, set | frozenset):
        return ("set", frozenset(map(_key, value)))
    return (type(value), value)  # 1, 1.0 and True hash alike: the type tells them apart


def _same(a: BaseModel, b: BaseModel) -> bool:
    if type(a) is not type(b) or a.model_fields_set != b.model_fields_set:
        return False
    return all(_same_value(x, b.__dict__.get(n, _MISSING)) for n, x in a.__dict__.items()) and len(a.__dict__) == len(
        b.__dict__
    )


_MISSING = object()


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, BaseModel) or isinstance(b, BaseModel):
        return a is b
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_value, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(v, b[k]) for k, v in a.items())
    return type(a) is type(b) and bool(a == b)
