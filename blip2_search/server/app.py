"""The HTTP API and web page over one open `Library`: parse the request, call one library method, render.

Model calls (search, similar, rerank) run one at a time in a worker thread, and wait for their turn in
the event loop (`runner`), so thumbnails, status and the page are served while queries run and queue.
Routes are listed in docs/server.md.
"""

import asyncio
import errno
import logging
import os
import signal
import socket
import threading
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Annotated, Callable, Literal
from urllib.parse import parse_qsl, quote

import uvicorn
from fastapi import Depends, FastAPI, File, Form, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse as _JSONResponse
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match

from .. import __version__
from ..api import rerank as score_images
from ..errors import Blip2SearchError, ImageDecodeError, InvalidInputError, LibraryError, ModelLoadError, ModelNotFoundError, worded
from ..images import DEFAULT_MAX_PIXELS, decoded_pixels, model_draft_side, model_image
from ..library import Library, LibraryStatus
from ..search.query import parse_query
from ..search.results import parse_date
from ..store.records import STATUS_INDEXED, STATUS_PENDING
from . import limits
from .limits import ApiError, MAX_K, MAX_PATH_GLOB_CHARS, check_query_text
from .photos import THUMBS_DIRNAME, PhotoUnavailable, Photos
from .runner import Runner
from .schemas import RERANK_UPLOAD_FORM, ErrorOut, RerankIds, RerankOut, SearchOut
from .security import TOKEN_COOKIE, Guard, RedactTokenFilter, allowed_host_names, check_bind, check_token, token_cookie, token_matches, without_token

log = logging.getLogger("blip2_search.server")
_REDACT_TOKEN = RedactTokenFilter()

_ERRORS = {code: {"model": ErrorOut} for code in (400, 401, 403, 404, 413, 422, 503)}  # every route can answer these
_IMAGE_ID = Annotated[int, Path(ge=1, le=limits.MAX_IMAGE_ID, description="An id from /api/search results.")]
_STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8", "index.html": "text/html; charset=utf-8"}
_MEDIA_TYPES = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".jpe": "image/jpeg", ".jfif": "image/jpeg", ".png": "image/png",
    ".webp": "image/webp", ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff", ".bmp": "image/bmp",
    ".dib": "image/bmp", ".heic": "image/heic", ".heif": "image/heif", ".hif": "image/heif", ".avif": "image/avif",
}

# Filters shared by text and image search (query string for GET, form fields for POST).
_K_HELP = f"How many results (1..{MAX_K})."
_PATH_HELP = "Only paths matching this glob, e.g. */2023/* ('*' crosses '/')."
_AFTER_HELP = "Only photos taken on or after this date (YYYY-MM-DD or ISO date-time, camera-local)."
_BEFORE_HELP = "Only photos taken on or before this date (YYYY-MM-DD or ISO date-time, camera-local)."
_MIN_HELP = "Only results whose ITC cosine is at least this."


@dataclass(frozen=True)
class _SearchParams:
    """The count and the filters every search takes, as the request gave them (checked by `filters`)."""

    k: int
    path: str | None
    after: str | None
    before: str | None
    min_score: float | None
    sort: str

    def filters(self) -> dict:
        """Keyword arguments for `Library.search` / `Library.similar`."""
        path = self.path if self.path and self.path.strip() else None  # an empty form field means no filter
        return {"path": path, "after": parse_date(self.after, name="after", end_of_day=False),
                "before": parse_date(self.before, name="before", end_of_day=True), "min_score": self.min_score, "sort": self.sort}


def _search_params(kind):
    """A dependency reading `_SearchParams` from the query string (`Query`) or a form (`Form`)."""

    def read(
        k: Annotated[int, kind(ge=1, le=MAX_K, description=_K_HELP)] = 10,
        path: Annotated[str | None, kind(max_length=MAX_PATH_GLOB_CHARS, description=_PATH_HELP)] = None,
        after: Annotated[str | None, kind(max_length=40, description=_AFTER_HELP)] = None,
        before: Annotated[str | None, kind(max_length=40, description=_BEFORE_HELP)] = None,
        min_score: Annotated[float | None, kind(ge=-limits.MAX_MIN_SCORE, le=limits.MAX_MIN_SCORE, allow_inf_nan=False,
                                                 description=_MIN_HELP)] = None,
        sort: Annotated[Literal["score", "date"], kind(description="Order of the results.")] = "score",
    ) -> _SearchParams:
        return _SearchParams(k, path, after, before, min_score, sort)

    return read


_QUERY_SEARCH = Annotated[_SearchParams, Depends(_search_params(Query))]
_FORM_SEARCH = Annotated[_SearchParams, Depends(_search_params(Form))]


class JSONResponse(_JSONResponse):
    """JSON whose strings are valid UTF-8: a file name that is not (Linux allows any bytes; Python holds
    them as lone surrogates) is shown with its odd bytes escaped, ``bad\\xffname.jpg``. Ids, not
    paths, name images in requests, so nothing needs to round-trip."""

    def render(self, content) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return super().render(_displayable(content))


def _displayable(value):
    """`value` with every string made encodable as UTF-8 (see `JSONResponse`)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape" if _only_escaped_bytes(value) else "backslashreplace").decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {_displayable(k): _displayable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_displayable(v) for v in value]
    return value


def _only_escaped_bytes(text: str) -> bool:
    """True when every lone surrogate in `text` stands for an undecodable byte (os.fsdecode's escapes)."""
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def create_app(library: Library, *, token: str | None = None, host: str = "127.0.0.1") -> FastAPI:
    """The ASGI app serving `library` (kept open by the caller). `host` is where it listens: bound to
    loopback without a token, only loopback Host names are served (see `security`)."""
    token = check_token(token, "token")  # a keyword of create_app and serve; the CLI checks its --token itself
    app = FastAPI(
        title="blip2-search", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,  # served below
        description="Find photos by describing them (BLIP-2). See docs/server.md.",
    )
    runner = Runner()
    app.state.runner = runner  # `serve` stops it when shutting down
    photos = Photos(library.metadata, library.folder / THUMBS_DIRNAME)
    pages = {name: (resources.files(__package__) / "static" / name).read_bytes() for name in _STATIC}
    _install_error_handlers(app)
    app.add_middleware(Guard, token=token, allowed_hosts=allowed_host_names(host, token), max_body=limits.MAX_BODY_BYTES)
    app.openapi = _openapi_with_security(app)

    # ------------------------------------------------------------------ the web page
    @app.get("/", include_in_schema=False)
    async def index(request: Request, token_param: Annotated[str | None, Query(alias="token")] = None) -> Response:
        if token_param is not None and token:
            # Log the browser in: the cookie lets <img> tags send the token; the redirect drops it from the URL
            # and keeps the rest: the search the page was opened with (/?q=red&k=12) runs once signed in.
            rest = without_token(quote(request.scope.get("query_string", b""), safe="!$&'()*+,;=:@/?%"))
            back = f"/?{rest}" if rest else "/"
            if not token_matches(token, token_param):
                return RedirectResponse(f"{back}#bad-token", status_code=303)
            response = RedirectResponse(back, status_code=303)
            response.set_cookie(*token_cookie(request.scope, token), httponly=True, samesite="strict", path="/")
            return response
        return Response(pages["index.html"], media_type=_STATIC["index.html"], headers={"cache-control": "no-cache"})

    @app.get("/app.js", include_in_schema=False)
    async def script() -> Response:
        return Response(pages["app.js"], media_type=_STATIC["app.js"], headers={"cache-control": "no-cache"})

    @app.get("/app.css", include_in_schema=False)
    async def style() -> Response:
        return Response(pages["app.css"], media_type=_STATIC["app.css"], headers={"cache-control": "no-cache"})

    # ------------------------------------------------------------------ the API
    @app.get("/api/status", response_model=LibraryStatus, responses=_ERRORS, summary="Library counts and models (status --json)")
    async def status(request: Request) -> JSONResponse:
        _check_query_string(request)
        return JSONResponse(asdict(await runner.io(library.status)))

    @app.get("/api/openapi.json", include_in_schema=False)
    async def openapi_schema(request: Request) -> JSONResponse:
        _check_query_string(request)
        return JSONResponse(app.openapi())

    @app.get("/api/search", response_model=SearchOut, responses=_ERRORS, summary="Search by text (search --json)")
    async def search_text(
        q: Annotated[str, Query(description="The query; see docs/queries.md for \"term\" - \"negative\" and 2:\"weights\".")],
        search: _QUERY_SEARCH,
        rerank: Annotated[bool, Query(description="Rescore the top candidates with the ITM head (ITM logit + ITC).")] = True,
        rerank_k: Annotated[int | None, Query(ge=1, le=MAX_K, description="Candidates to rerank [default: 128 on GPU, 16 on CPU].")] = None,
        fusion: Annotated[bool, Query(description="Also match the generated captions (reciprocal rank fusion).")] = True,
        request: Request = None,
    ) -> JSONResponse:
        _check_query_string(request, SEARCH_QUERY_PARAMS)
        check_query_text(q)
        filters = search.filters()
        result = await runner.model(request, library.search, q, search.k, rerank=rerank, rerank_k=rerank_k, fusion=fusion, **filters)
        return JSONResponse(worded(result.as_dict()))

    @app.post("/api/search", response_model=SearchOut, responses=_ERRORS, summary="Search by example image (search --image)")
    async def search_image(
        image: Annotated[UploadFile, File(description="The example picture (at most 20 MB).")],
        search: _FORM_SEARCH,
        request: Request = None,
    ) -> JSONResponse:
        _check_query_string(request)
        _check_search_form(await request.form())  # FastAPI has parsed it; the limits /api/rerank applies while parsing
        filters = search.filters()
        _check_upload_size(image)
        picture = await _model_input(request, image)
        result = await runner.model(request, library.similar, picture, search.k, **filters)
        return JSONResponse(worded(result.as_dict()))

    @app.get("/api/images/{image_id}/similar", response_model=SearchOut, responses=_ERRORS,
             summary="Photos like a library image, from its stored vectors (more like this)")
    async def search_like(
        image_id: _IMAGE_ID,
        search: _QUERY_SEARCH,
        request: Request = None,
    ) -> JSONResponse:
        _check_query_string(request, SIMILAR_QUERY_PARAMS)
        filters = search.filters()
        records = await runner.io(photos.records, [image_id])
        if not records or records[0].status != STATUS_INDEXED:
            raise ApiError(404, f"id {image_id} is not a searchable image of this library (unknown, gone, or waiting to be re-embedded); "
                                "use ids from /api/search results")
        result = await runner.model(request, library.similar, image_id, search.k, **filters)
        return JSONResponse(worded(result.as_dict()))

    @app.post(
        "/api/rerank", response_model=RerankOut, responses={**_ERRORS, 415: {"model": ErrorOut}},
        summary="ITM scores of library images (JSON ids) or of uploaded images (multipart)",
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": RerankIds.model_json_schema()},
            "multipart/form-data": {"schema": RERANK_UPLOAD_FORM},
        }}},
    )
    async def rerank(request: Request) -> JSONResponse:
        _check_query_string(request)
        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind == "application/json":
            return JSONResponse(await _rerank_ids(request))
        if kind == "multipart/form-data":
            return JSONResponse(await _rerank_uploads(request))
        raise ApiError(415, f"POST /api/rerank takes application/json {{\"query\", \"ids\"}} or multipart/form-data "
                            f"(query, images), not {kind or 'a body without Content-Type'}; set the Content-Type header")

    async def _rerank_ids(request: Request) -> dict:
        body = await _json_body(request)
        try:
            req = RerankIds.model_validate_json(body)
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]) from None
        query = check_query_text(req.query, "query")
        ids = list(dict.fromkeys(req.ids))
        readable, refused = await runner.io(_checked_ids, photos, ids)
        ranked = await runner.model(request, library.rerank, query, readable)  # parses the query even when no id is readable
        results, errors = [], [{"id": i, "error": msg} for i, msg in refused]
        for h in ranked.hits:
            if h.itm_logit is None:
                errors.append({"id": h.id, "error": f"image {h.id} could not be read for reranking, or changed since it was indexed; index its folder again"})
                continue
            results.append(h.as_dict())
        return {"query": query, "results": results, "errors": errors, **_notes_of(ranked.notes)}

    async def _rerank_uploads(request: Request) -> dict:
        async with request.form(max_files=limits.MAX_RERANK_UPLOADS, max_fields=limits.MAX_RERANK_UPLOADS + 4,
                                max_part_size=limits.MAX_FORM_FIELD_BYTES) as form:
            _check_names("POST /api/rerank", "form field", [key for key, _ in form.multi_items()], RERANK_FORM_FIELDS,
                         "check its spelling, or leave it out", repeatable=("images",))
            query = _form_field(form, "query", file=False)
            files = _form_field(form, "images", file=True)
            check_query_text(query, "query")
            for f in files:
                _check_upload_size(f)
            parse_query(query)  # a bad query is the answer, whatever the pictures
            decoded = await asyncio.gather(*(_model_input(request, f, refuse=False) for f in files))
            pictures = [(i, p) for i, p in enumerate(decoded) if not isinstance(p, str)]
            if not pictures:  # nothing the client sent was a picture: a 400, as for an image search
                raise ImageDecodeError(decoded[0])
            # library.encoder in the worker thread: it loads the model again where another process re-embedded the library
            ranking = await runner.model(request, lambda: score_images(query, [p for _, p in pictures], model=library.encoder))
        names, sent = [f.filename for f in files], [i for i, _ in pictures]
        results = [{"index": sent[h.index], "filename": names[sent[h.index]], "score": h.score, "itc": h.itc, "itm_logit": h.itm_logit,
                    "match_probability": h.match_probability} for h in ranking]
        errors = sorted([{"index": i, "filename": names[i], "error": p} for i, p in enumerate(decoded) if isinstance(p, str)]
                        + [{"index": sent[e.index], "filename": names[sent[e.index]], "error": _upload_fix(e.error)} for e in ranking.errors],
                        key=lambda e: e["index"])
        return {"query": ranking.query, "results": results, "errors": errors, **_notes_of(ranking.notes)}

    async def _model_input(request: Request, upload: UploadFile, *, refuse: bool = True):
        """`upload` decoded to the model's input size as `index` decodes a photo, in a worker thread within the
        decode budget, before the request waits for its turn with the model: the turn then holds the model
        alone, and a queued request holds a model-size picture (a 12 MP JPEG takes ~35 ms to decode on one
        core; ViT-g embeds ~1,000 images a second on an H100). Not a picture: ImageDecodeError, or with
        refuse=False its message, for an answer that lists it."""
        runner.admit(request)
        source = _NamedUpload(upload)

        def header():  # one worker-thread turn: the model's input (it may load the model) and the header's pixels
            size, resample = library.encoder.image_input
            return size, resample, decoded_pixels(source, draft_side=model_draft_side(size, resample))

        try:
            size, resample, pixels = await runner.io(header)
            return await runner.decode(pixels, model_image, source, size, resample)
        except ImageDecodeError as exc:
            if refuse:
                raise ImageDecodeError(_upload_fix(str(exc))) from None
            return _upload_fix(str(exc))

    @app.get("/api/images/{image_id}/thumbnail", responses={200: {"content": {"image/jpeg": {}}}, **_ERRORS},
             response_class=Response, summary="JPEG thumbnail, upright, long side 320 px (cached)")
    async def thumbnail(image_id: _IMAGE_ID, request: Request) -> Response:
        _check_query_string(request)
        found = await runner.io(photos.cached_thumbnail, image_id)
        if isinstance(found, bytes):
            jpeg = found
        else:
            try:  # a full decode holds the whole picture: made within the decode budget
                jpeg = await runner.decode(found.pixels, photos.make_thumbnail, found)
            finally:
                found.close()  # already closed, unless cancelled while waiting for its turn
        headers = {"cache-control": "private, max-age=300", "content-length": str(len(jpeg))}
        return Response(b"" if request.method == "HEAD" else jpeg, media_type="image/jpeg", headers=headers)

    @app.get("/api/images/{image_id}", responses={200: {"content": {"image/*": {}}}, **_ERRORS},
             response_class=Response, summary="The original file of an indexed image")
    async def original(image_id: _IMAGE_ID, request: Request) -> Response:
        _check_query_string(request)
        photo = await runner.io(photos.open, image_id)
        name = os.path.basename(photo.record.path)
        media_type = _MEDIA_TYPES.get(os.path.splitext(name)[1].lower(), "application/octet-stream")
        headers = {
            "content-length": str(photo.size),
            "content-disposition": f"inline; filename*=UTF-8''{quote(os.fsencode(name), safe='')}",
            "cache-control": "private, max-age=300",
        }
        if request.method == "HEAD":  # the same checks and headers, no body
            photo.file.close()
            return Response(b"", media_type=media_type, headers=headers)
        return StreamingResponse(photo.chunks(), media_type=media_type, headers=headers)

    for path, endpoint in (("/api/images/{image_id}/thumbnail", thumbnail), ("/api/images/{image_id}", original)):
        app.add_api_route(path, endpoint, methods=["HEAD"], response_class=Response, responses=_ERRORS,
                          operation_id=f"head_{endpoint.__name__}", summary="The GET's headers (checks included), no body")
    # Every other GET answers HEAD too: the same work and headers, the body dropped (by the Guard).
    headed = {route.path for route in app.routes if isinstance(route, APIRoute) and "HEAD" in route.methods}
    for route in [r for r in app.routes if isinstance(r, APIRoute) and "GET" in r.methods and r.path not in headed]:
        app.add_api_route(route.path, route.endpoint, methods=["HEAD"], response_class=route.response_class, include_in_schema=False)

    return app


async def _json_body(request: Request) -> bytes:
    """The body, read only up to MAX_JSON_BYTES: 413 for a larger Content-Length before reading, and for a
    streamed (chunked) body as soon as it goes past the limit."""
    fix = f"send a query of at most {limits.MAX_QUERY_BYTES} bytes and at most {limits.MAX_RERANK_IDS} ids"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.MAX_JSON_BYTES:
        raise ApiError(413, f"JSON body is {int(declared)} bytes, over the {limits.MAX_JSON_BYTES}-byte limit; {fix}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.MAX_JSON_BYTES:
            raise ApiError(413, f"JSON body goes over the {limits.MAX_JSON_BYTES}-byte limit; {fix}")
    return bytes(body)


def _notes_of(notes) -> dict:
    """A rerank answer's `notes` (e.g. a query longer than BLIP-2 reads), present only when there are some, as search's."""
    return {"notes": worded(notes)} if notes else {}


SEARCH_QUERY_PARAMS = ("q", "k", "rerank", "rerank_k", "fusion", "path", "after", "before", "min_score", "sort")  # GET /api/search's
SIMILAR_QUERY_PARAMS = ("k", "path", "after", "before", "min_score", "sort")  # GET /api/images/{id}/similar's
SEARCH_FORM_FIELDS = ("image", "k", "path", "after", "before", "min_score", "sort")  # POST /api/search's parameters
RERANK_FORM_FIELDS = ("query", "images")  # POST /api/rerank's, multipart


def _check_query_string(request: Request, allowed: tuple[str, ...] = ()) -> None:
    """Refuse percent-escapes that are not UTF-8 (Starlette would search U+FFFD instead), and unknown or
    repeated parameters (see `_check_names`): every /api route checks its query string, also those that
    take no parameter there (POST ones take theirs in the body: POST /api/search?k=5 would ignore k)."""
    raw = request.scope.get("query_string", b"").decode("latin-1")
    try:
        pairs = parse_qsl(raw, keep_blank_values=True, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise InvalidInputError("the query string is not UTF-8; percent-encode the text as UTF-8 (e.g. caf%C3%A9)") from None
    fix = ("check its spelling, or leave it out" if allowed else "leave it out" if request.method in ("GET", "HEAD") else
           "send the request's parameters in its body, as /api/openapi.json describes")
    _check_names(f"{request.method} {request.url.path}", "query parameter", [name for name, _ in pairs], allowed, fix)


def _check_names(route: str, kind: str, names: list[str], allowed: tuple[str, ...], fix: str, *, repeatable: tuple[str, ...] = ()) -> None:
    """422 for a parameter `route` does not take (a misspelt filter would be ignored: unfiltered results) and
    for one given more than once (only one value would count)."""
    unknown = sorted({name for name in names if name not in allowed})
    if unknown:
        raise ApiError(422, f"{route} takes no {kind} {', '.join(map(repr, unknown))} (it takes {', '.join(allowed) or 'none'}); {fix}")
    repeated = sorted({name for name in names if names.count(name) > 1 and name not in repeatable})
    if repeated:
        raise ApiError(422, f"{route}: {kind} {', '.join(map(repr, repeated))} is given more than once; give it once")


def _check_search_form(form) -> None:
    """POST /api/search takes one picture in `image` and short text fields (docs/server.md's limits). A text
    field over the limit is a 400, as the parser of /api/rerank makes it; an unknown or repeated field (two
    pictures), a missing one or one of the wrong kind is a 422, as FastAPI makes a missing `image`."""
    for key, value in form.multi_items():
        if isinstance(value, str) and len(value.encode("utf-8", "surrogatepass")) > limits.MAX_FORM_FIELD_BYTES:
            raise InvalidInputError(f"form field {key!r} is {len(value.encode('utf-8', 'surrogatepass'))} bytes, over the "
                                    f"{limits.MAX_FORM_FIELD_BYTES}-byte limit for a text field; shorten it")
    _check_names("POST /api/search", "form field", [key for key, _ in form.multi_items()], SEARCH_FORM_FIELDS,
                 "check its spelling, or leave it out (an image search is not reranked and has no query text)")
    _form_field(form, "image", file=True)
    for key in SEARCH_FORM_FIELDS[1:]:
        if key in form:
            _form_field(form, key, file=False)


def _form_field(form, name: str, *, file: bool):
    """The value of multipart field `name` (a list of files for `images`), or a 422 when it is missing or is a
    file where text belongs (or text where a file does), worded as FastAPI's validation errors are."""
    values = form.getlist(name)
    if not values:
        raise ApiError(422, f"{name}: Field required; {limits.FIXES[name]}")
    wrong = [v for v in values if isinstance(v, StarletteUploadFile) != file]
    if wrong:
        got, wanted = ("text", "a file") if file else ("a file", "text")
        raise ApiError(422, f"{name}: Input should be {wanted}, not {got}; {limits.FIXES[name]}")
    return values if name == "images" else values[0]


class _NamedUpload:
    """An upload's (spooled) file under the name the client gave it, so decode errors name the upload."""

    def __init__(self, upload: UploadFile):
        self._file = upload.file
        self.name = upload.filename or "upload"

    def __getattr__(self, attr):
        return getattr(self._file, attr)


def _check_upload_size(upload: UploadFile) -> None:
    """413 for an upload over MAX_UPLOAD_BYTES, before any work is queued for it."""
    size = upload.size if upload.size is not None else upload.file.seek(0, os.SEEK_END)
    if size > limits.MAX_UPLOAD_BYTES:
        raise ApiError(413, f"upload {upload.filename or 'upload'!r} is {size / 1e6:.1f} MB, over the "
                            f"{limits.MAX_UPLOAD_BYTES // (1024 * 1024)} MB limit; resize or re-export the image")


def _upload_fix(message: str) -> str:
    """A decode error of an upload, with the fix for someone uploading (the library's speaks to callers of open_image)."""
    return (f"{message.rsplit('; ', 1)[0]}; upload a JPEG, PNG, WebP, GIF, TIFF, BMP, HEIC or AVIF picture of at most "
            f"{DEFAULT_MAX_PIXELS // 1_000_000} megapixels")


def _checked_ids(photos: Photos, ids: list[int]) -> tuple[list[int], list[tuple[int, str]]]:
    """([id whose file may be read], [(id, why refused)]) for rerank by id; unknown ids are a 404."""
    found = {r.id: r for r in photos.records(ids)}
    unknown = [i for i in ids if i not in found]
    if unknown:
        shown = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
        what = f"id {shown} is not an indexed image" if len(unknown) == 1 else f"ids {shown} are not indexed images"
        raise ApiError(404, f"{what} of this library; use ids from /api/search results")
    readable, refused = [], []
    for image_id in ids:
        if found[image_id].status == STATUS_PENDING:  # its vectors are being recomputed with the library's new model
            refused.append((image_id, f"image {image_id} is waiting to be re-embedded with the library's new model (index --reembed); "
                                      "retry after that index run"))
            continue
        try:
            photos.real_path(found[image_id])
            readable.append(image_id)
        except PhotoUnavailable as exc:
            refused.append((image_id, str(exc)))
    return readable, refused


# ---------------------------------------------------------------------- errors at the edge
# Bad input is the client's to fix (400); a missing model or a broken library is the server's (503).
_STATUS_OF = ((InvalidInputError, 400), (ImageDecodeError, 400), (ModelNotFoundError, 503), (ModelLoadError, 503),
              (LibraryError, 503), (Blip2SearchError, 400))


def _install_error_handlers(app: FastAPI) -> None:
    """Every error is JSON `{"error": "..."}`; library errors keep their message, crashes show none."""

    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if isinstance(exc, ApiError):
            pass
        elif exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}; the API is described at /api/openapi.json"
        elif exc.status_code == 405:
            allowed = sorted({m for route in request.app.routes if isinstance(route, BaseRoute) and route.matches(request.scope)[0] != Match.NONE
                              for m in (getattr(route, "methods", None) or ())})
            message = f"{request.method} is not allowed on {request.url.path}; it takes {', '.join(allowed) or 'no method'} (see /api/openapi.json)"
            return JSONResponse({"error": message}, status_code=405, headers={"allow": ", ".join(allowed)})
        elif exc.status_code == 400:  # the form or JSON parser's words, e.g. "Missing boundary in multipart."
            wanted = ("multipart/form-data with the picture in 'image'" if request.url.path == "/api/search" else
                      f"JSON, or multipart/form-data with at most {limits.MAX_RERANK_UPLOADS} files")
            message = f"the request body could not be read ({message.rstrip('.')}); send {wanted} as /api/openapi.json describes"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": limits.describe_validation_errors(exc.errors())}, status_code=422)

    async def on_library(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, PhotoUnavailable):
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        status = next(code for kind, code in _STATUS_OF if isinstance(exc, kind))
        # a request parameter is named as the library's keyword (`rerank_k=0`); a command to run, as the CLI
        # that serves (`index --store-vit`): the server's operator runs it
        return JSONResponse({"error": exc.naming(commands=True)}, status_code=status)

    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error while handling {request.method} {request.url.path}; "
                                      "the server log has the details"}, status_code=500)

    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(PhotoUnavailable, on_library)
    app.add_exception_handler(Blip2SearchError, on_library)
    app.add_exception_handler(Exception, on_crash)


def _openapi_with_security(app: FastAPI):
    """The generated schema, plus how to authenticate (needed only when the server has a token)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "The --token the server was started with."},
                "cookie": {"type": "apiKey", "in": "cookie", "name": f"{TOKEN_COOKIE}_PORT",
                           "description": "Set by opening /?token=TOKEN; PORT is the server's port."},
            }
            schema["security"] = [{"bearer": []}, {"cookie": []}, {}]
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn makes it listen once the app is ready, so early clients are
    refused rather than left waiting). An address in use, a privileged port or a host that is not this
    machine's is an InvalidInputError naming the fix, raised before anything else starts."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise InvalidInputError("cannot listen on {argument:{given}} ({reason}); pass an address of this machine, e.g. {argument:'127.0.0.1'}",
                                argument="host", given=repr(host), reason=exc.strerror) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a closed server's lingering port is free
        sock.bind(address)
    except OSError as exc:
        sock.close()
        argument, fix = {errno.EADDRINUSE: ("port", "pass another {argument}, or stop the program that uses it"),
                         errno.EACCES: ("port", "ports below 1024 need privileges: pass a higher {argument}"),
                         errno.EADDRNOTAVAIL: ("host", "that address is not this machine's: pass {argument:'127.0.0.1'} or one of its addresses"),
                         }.get(exc.errno, ("port", "pass another {argument} (or host)"))
        raise InvalidInputError("cannot listen on {host} port {port} ({reason}); " + fix, argument=argument, host=host, port=port,
                                reason=exc.strerror or exc) from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, which on shutdown first turns away the queued model calls (`Runner.stop`): uvicorn
    waits for every open request, and would run each queued query first."""

    def __init__(self, config: uvicorn.Config, runner: Runner, ready: Callable[[], None] | None = None):
        super().__init__(config)
        self._runner = runner
        self._ready = ready

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._ready is not None:  # listening: a client told where it serves can connect now
            self._ready()

    async def shutdown(self, sockets=None) -> None:
        self._runner.stop()
        await super().shutdown(sockets=sockets)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(library: Library, *, host: str = "127.0.0.1", port: int = 8765, token: str | None = None, log_level: str = "info",
          sock: socket.socket | None = None, ready: Callable[[], None] | None = None) -> None:
    """Serve `library` with uvicorn until interrupted, on `sock` (from `bind_socket`) or a new one on host:port.
    Loads the text model first, so a broken model or an empty library fails here, before the port
    listens; calls `ready` (e.g. to say where it serves) once it listens. SIGINT (Ctrl-C) and SIGTERM (`kill`,
    systemd, docker stop) both shut it down gracefully and then raise KeyboardInterrupt."""
    # Where it listens is the socket's address when given one: the bind rule and the Host check both go by it (a
    # loopback socket served without a token answers loopback names only, whatever `host` says).
    address = sock.getsockname()[0] if sock is not None else host
    check_bind(address, token, "token", bound=sock is not None)  # as `blip2-search serve` does
    sock = sock if sock is not None else bind_socket(host, port)
    app = create_app(library, token=token, host=address)
    library.search("a photo", 1, rerank=False, fusion=False)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, server_header=False, proxy_headers=False)
    logging.getLogger("uvicorn.access").addFilter(_REDACT_TOKEN)  # after Config, which sets up uvicorn's logging
    # uvicorn shuts down gracefully on SIGTERM too, then raises the signal again: by default that kills the
    # process (exit 143, the caller's cleanup skipped); as KeyboardInterrupt it ends as Ctrl-C does.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        _Server(config, app.state.runner, ready).run(sockets=[sock])
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


__all__ = ["bind_socket", "create_app", "serve"]
