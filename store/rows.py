"""Rows of a prepared query made into models without peewee's per-query set-up.

peewee resolves a result's columns against the query on every execution and fills each model
through its field descriptors; for a page that reads a handful of rows that is most of the
query's cost. A ``RowPlan`` is taken from a cursor wrapper peewee has already set up (same SQL,
so same columns), and then writes each converted value straight into the model's ``__data__``,
which is what the descriptors do on a fresh instance. Shapes it does not know (dicts, tuples,
computed columns) keep peewee's own path.
"""

from __future__ import annotations

from typing import Any

import peewee as pw

# (column index, field name, converter or None, whether the converter changes a None, the type
# the converter gives back unchanged)
Column = tuple[int, str, Any, bool, Any]
# (source model, attribute, joined model, outer join?, attribute is the source's foreign key?)
Link = tuple[Any, str, Any, bool, bool]


class RowPlan:
    def __init__(self, root: Any, columns: list[tuple[Any, list[Column]]], links: list[Link]):
        self.root = root
        self.columns = columns  # per model
        self.links = links

    @classmethod
    def of(cls, peewees: Any) -> RowPlan | None:
        """The plan of a set-up wrapper (it has read a row), or None for a shape it does not
        know."""
        wrapper: Any = peewees  # its set-up attributes are not in peewee's stubs
        if not getattr(wrapper, "initialized", False):
            return None
        if type(peewees) is pw.ModelObjectCursorWrapper:
            model = wrapper.constructor
            if not wrapper.is_model:
                return None
            keys = [model] * wrapper.ncols
            names = wrapper.unique_columns
            return cls._build(model, [model], keys, names, wrapper.converters, [])
        if type(peewees) is pw.ModelCursorWrapper:
            models = []
            for key, constructor, is_model in wrapper._constructor_list:
                if not is_model or key is not constructor:  # aliases, dicts, tuples
                    return None
                models.append(key)
            keys = [spec[1] for spec in wrapper._row_spec]
            names = [spec[2] for spec in wrapper._row_spec]
            links = []
            for src, attr, dest, is_dict, is_outer, is_fk in wrapper.src_to_dest:
                if is_dict or dest in wrapper._dest_reachable:  # only one level of joins
                    return None
                links.append((src, attr, dest, is_outer, is_fk))
            return cls._build(wrapper.model, models, keys, names, wrapper.converters, links)
        return None

    @classmethod
    def _build(
        cls,
        root: Any,
        models: list[Any],
        keys: list[Any],
        names: list[str],
        converters: list[Any],
        links: list[Link],
    ) -> RowPlan | None:
        columns: dict[Any, list[Column]] = {model: [] for model in models}
        for index, (key, name) in enumerate(zip(keys, names, strict=True)):
            # Only plain columns of a selected model: their descriptors just store the value.
            if key not in models or name not in key._meta.fields:
                return None
            if name in key._meta.manytomany:
                return None
            convert = converters[index]
            on_none = convert is not None and _changes_none(convert)
            columns[key].append((index, name, convert, on_none, _kept_as(convert)))
        return cls(root, list(columns.items()), links)

    def rows(self, cursor: Any) -> list[Any]:
        try:
            return [self.make(row) for row in cursor.fetchall()]
        finally:
            cursor.close()

    def make(self, row: tuple[Any, ...]) -> Any:
        objects = {}
        filled = set()
        for model, columns in self.columns:
            objects[model] = instance = model(__no_default__=True)
            data = instance.__data__
            seen = False
            for index, name, convert, on_none, kept in columns:
                value = row[index]
                if value is None:
                    data[name] = convert(None) if on_none else None
                else:
                    seen = True
                    if convert is None or type(value) is kept:
                        data[name] = value
                    else:
                        data[name] = convert(value)
            if seen:
                filled.add(model)
        for src, attr, dest, is_outer, is_fk in self.links:
            joined = objects[dest]
            if dest not in filled:
                if not is_outer:
                    continue
                if src not in filled:
                    continue
                joined = None
            if is_fk and joined is None:
                objects[src].__rel__[attr] = None  # known to have no row, the id kept
            else:
                setattr(objects[src], attr, joined)
                objects[src]._dirty.clear()
        return objects[self.root]


def _changes_none(convert: Any) -> bool:
    """Whether a converter must see a NULL (peewee's fields all give None back for one)."""
    try:
        return convert(None) is not None
    except Exception:
        return True


# Fields whose converter returns a value of this exact type as it is (``str`` -> itself, ``int``
# -> ``int(value)``, the same number); their subclasses may convert differently.
_UNCHANGED = {pw.CharField: str, pw.TextField: str, pw.IntegerField: int, pw.AutoField: int}


def _kept_as(convert: Any) -> Any:
    """The type ``convert`` (a field's python_value) passes through unchanged, if any."""
    field: Any = getattr(convert, "__self__", None)
    method = getattr(convert, "__func__", None)
    if isinstance(field, pw.ForeignKeyField) and method is pw.ForeignKeyField.python_value:
        field = field.rel_field  # an id, never an instance of the related model, goes there
    elif method is not pw.Field.python_value:
        return None
    if type(field).python_value is not pw.Field.python_value:
        return None
    return _UNCHANGED.get(type(field))
