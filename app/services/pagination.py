"""Cursor pagination as OpenAI lists do it: `after` names the last object already seen."""

from sqlalchemy import Select, tuple_
from sqlalchemy.orm import Session


def page(
    session: Session, query: Select, keys: tuple, pivot: tuple | None, limit: int, *, descending: bool = True
) -> tuple[list, bool]:
    """Rows of `query` ordered by `keys` that come after `pivot`, and whether more follow."""
    if pivot is not None:
        query = query.where(tuple_(*keys) < pivot if descending else tuple_(*keys) > pivot)
    query = query.order_by(*(k.desc() if descending else k.asc() for k in keys)).limit(limit + 1)
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit
