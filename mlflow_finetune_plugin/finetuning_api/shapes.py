"""OpenAI's shapes: the error every 4xx carries, and the list pages (`{object: list, data, has_more}`, paged
by `after=<last id>`)."""

from __future__ import annotations

from mlflow_finetune_plugin.errors import FinetuneError


class APIError(FinetuneError):
    """A request refused as OpenAI refuses it: HTTP status, `error {message, type, param, code}`."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def not_found(what: str, ident: str, param: str | None = None) -> APIError:
    return APIError(404, f"No such {what}: {ident!r}.", code=f"{what.replace(' ', '_')}_not_found",
                    param=param)


def page(items: list[dict], after: str | None, limit: int | None, default_limit: int = 20) -> dict:
    """One page of `items` (already in the list's order): those after the item with id `after`, at most
    `limit`."""
    limit = default_limit if limit is None else limit
    if not 1 <= limit <= 10000:
        raise APIError(400, f"limit must be between 1 and 10000 (got {limit}).", code="invalid_limit",
                       param="limit")
    start = 0
    if after:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise APIError(400, f"after={after!r} names nothing in this list.", code="invalid_after",
                           param="after")
        start = ids.index(after) + 1
    chosen = items[start:start + limit]
    return {"object": "list", "data": chosen, "has_more": start + limit < len(items),
            "first_id": chosen[0]["id"] if chosen else None, "last_id": chosen[-1]["id"] if chosen else None}
