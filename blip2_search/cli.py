"""The command line: parse, call one library function, render. No model, SQL or FAISS code here."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import asdict

import click

from .errors import Blip2SearchError, IndexInterrupted, one_line, worded
from .models.loading import DEFAULT_CAPTIONER, DEFAULT_EMBEDDER

EXIT_USAGE = 2


class UserError(click.ClickException):
    """A library error shown as one line on stderr, exit code 2, no traceback."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))  # it may name a file (--queries FILE) whose name holds a newline


def _quiet_libraries() -> None:
    """Keep HF's load reports and progress bars off stdout, which carries our JSON.

    Environment switches only: importing transformers here would cost seconds for `status`.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _note(note: str) -> None:
    """A note of the library's answer on stderr, on one line (it may name a file); why there are no results reads as it is."""
    note = worded(note, _option)
    click.echo(one_line(note) if note.startswith("no results:") else f"note: {one_line(note)}", err=True)


def _emit(data) -> None:
    click.echo(json.dumps(worded(data, _option), indent=2))


def _option_in(command, argument: str | None) -> str | None:
    """The option of `command` that sets the library's `argument` ("rerank_k": "--rerank-k"), if it has one."""
    return next((p.opts[0] for p in getattr(command, "params", ()) if isinstance(p, click.Option) and p.name == argument), None)


def _option(argument: str) -> str:
    """How the command being run names the library's `argument` in a note: by its option, else as the library does."""
    ctx = click.get_current_context(silent=True)
    return _option_in(ctx.command if ctx is not None else None, argument) or argument


def _clause(exc: click.UsageError) -> str:
    """click's message as one clause that '; ...' can follow: "No such option '--devce' (did you mean '--device'?)",
    not click's "No such option '--devce'. Did you mean '--device'?" with its own full stop and question mark."""
    guesses = sorted(getattr(exc, "possibilities", None) or ())
    if not guesses:
        return exc.format_message().rstrip(".")
    named = ", ".join(map(repr, guesses[:-1])) + " or " + repr(guesses[-1]) if len(guesses) > 1 else repr(guesses[0])
    return f"{exc.message.rstrip('.')} (did you mean {named}?)"


LIBRARY_COMMANDS = ("search", "serve", "duplicates", "status", "prune", "failures")  # commands that take no --model: the library's


def _flushed() -> bool:
    """Flush stdout and stderr; False where one could not be (a closed pipe: `| head`). Either is None where the
    program was started without it (`>&-`, a service)."""
    ok = True
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            ok = False
    return ok


def _end_at_ctrl_c(said: bool, code: int) -> None:
    """From now on Ctrl-C ends the process at once with `code`, saying "interrupted" unless the command `said` how
    it ended. Python's shutdown after a command still runs code (atexit callbacks and finalizers: about a second
    once torch is loaded) in which a KeyboardInterrupt prints a traceback and exits 0; the command has closed
    its library by then, so nothing is left to commit."""

    def end(signum, frame):
        _flushed()  # what the command printed (its JSON) is kept
        if not said:
            try:
                os.write(2, b"interrupted\n")
            except OSError:  # no stderr (`2>&-`): the exit code says it
                pass
        os._exit(code)

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where ignored (a background job `cmd &`)
        signal.signal(signal.SIGINT, end)


def _exit_now(end: SystemExit) -> None:
    """End the process with `end`'s code once the command has ended: flush what it printed, run the atexit callbacks
    (logging, multiprocessing, temporary files), then `os._exit`, skipping the interpreter's teardown, which frees every
    module and object one by one (about 1 s of a 4 s demo `search` once torch and transformers are loaded). Not where
    another thread still runs (it would be killed) or a profiler or tracer awaits its report; those exit as usual."""
    code = end.code
    if code is not None and not isinstance(code, int):
        return  # a message Python prints itself
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return
    if any(t is not threading.main_thread() and t.is_alive() and not t.daemon for t in threading.enumerate()):
        return
    if not _flushed():
        return  # e.g. a closed pipe (`| head`): Python's own exit reports it as usual
    import atexit

    atexit._run_exitfuncs()
    _flushed()  # what the callbacks printed: Python flushes after them too
    os._exit(code or 0)


class _Group(click.Group):
    _as_program = False  # run by __call__: the process is ours (click's CliRunner calls `main` in the tests' process)

    def __call__(self, *args, **kwargs):
        """The program: the console script, `python cli.py` and `python -m blip2_search.cli` call it so, without
        arguments (it reads sys.argv). Called with arguments it is run inside another program (a script, a notebook,
        `standalone_mode=False`), to which it returns (or raises SystemExit, as click does): that program's Ctrl-C
        and its exit stay its own."""
        self._as_program = not args and not kwargs
        try:
            return self.main(*args, **kwargs)
        except SystemExit as exc:  # how click ends every command it ran (standalone mode)
            if self._as_program:
                _exit_now(exc)
            raise
        finally:
            self._as_program = False

    def invoke(self, ctx):
        try:
            return self._invoke(ctx)
        finally:  # the command has ended: a Ctrl-C now ends as one during it would (`serve`'s: stopped, exit 0)
            if self._as_program:
                ended = sys.exc_info()[1]
                stopped = ctx.invoked_subcommand == "serve" and ended is None
                said = stopped or (isinstance(ended, SystemExit) and ended.code == 130)
                _end_at_ctrl_c(said, 0 if stopped else 130)

    def _option_of(self, ctx, argument: str | None) -> str | None:
        """The option of the command run that sets the library's `argument` ("rerank_k": "--rerank-k"), if it has one."""
        return _option_in(self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None, argument)

    def _invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Blip2SearchError as exc:
            raise UserError(exc.naming(self._option_of(ctx, exc.argument) or exc.argument, commands=True)) from None
        except KeyboardInterrupt:  # click would print "Aborted!" and exit 1, which reads as a failure
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.UsageError as exc:  # click's own checks: one line too, not the usage text
            where = exc.ctx.command_path if exc.ctx is not None and exc.ctx is not ctx else (
                f"{ctx.command_path} {ctx.invoked_subcommand}" if ctx.invoked_subcommand else ctx.command_path)
            hint = ""
            command = where.split()[-1]
            if isinstance(exc, click.NoSuchOption) and exc.option_name in ("--model", "--captioner") and command in LIBRARY_COMMANDS:
                uses = "uses the model the library was indexed with" if command in ("search", "serve", "duplicates") else "loads no model"
                change = "index --reembed --model M" if exc.option_name == "--model" else "index --captioner C"
                hint = f"; {command} {uses}, so leave {exc.option_name} out ({change} changes the library's)"
            elif isinstance(exc, click.NoSuchOption) and not exc.option_name.startswith("--") and "'--'" not in exc.format_message():
                hint = "; a file or folder whose name starts with '-' can be written ./-name"
            elif exc.format_message().startswith("Got unexpected extra argument") and where.endswith(" search") and "'--'" not in exc.format_message():
                hint = f"; put a query of several words in quotes: {where} \"a red car\""
            message = _clause(exc)
            if hint and isinstance(exc, click.NoSuchOption):
                message = f"No such option '{exc.option_name}'"  # not click's guess ("Did you mean '--help'?")
            raise UserError(f"{message}{hint}; see '{where} --help'") from None


class _QueryCommand(click.Command):
    """`search` and `rerank`: a query may start with '-' (a negative term, "-5 degrees"), which click would take for an option.

    An argument that starts with one '-' and cannot be an option (a space, a quote or a digit after the
    '-') and does not follow an option that takes a value is read as the query; anything else that
    looks like an unknown option gets the hint to put the query after '--'.
    """

    def parse_args(self, ctx, args):
        takes_value = {opt for p in self.params if isinstance(p, click.Option) and not p.is_flag for opt in p.opts}
        names = {opt for p in self.params if isinstance(p, click.Option) for opt in (*p.opts, *p.secondary_opts)}  # every option
        fixed = []
        for i, arg in enumerate(args):
            if arg == "--":  # what follows is never an option
                fixed.extend(args[i:])
                break
            follows_option = i > 0 and args[i - 1] in takes_value
            if not follows_option and arg.startswith("-") and not arg.startswith("--") and len(arg) > 1 and (
                not arg[1].isalpha() or any(c.isspace() for c in arg)
            ):
                arg = " " + arg  # no longer looks like an option; the space is taken off again below
            fixed.append(arg)
        try:
            rest = super().parse_args(ctx, fixed)
        except click.NoSuchOption as exc:
            token = next((a for a in args if a.startswith(exc.option_name)), exc.option_name)
            if token.startswith("--"):
                raise
            files = "; if it is an image, write it ./" + token if any(isinstance(p, click.Argument) and p.name == "images" for p in self.params) else ""
            raise click.UsageError(f"{_clause(exc)}; if {token!r} is the query, put it after '--': "
                                   f"{ctx.command_path} [OPTIONS] -- {token!r}{files}", ctx) from None
        except click.UsageError as exc:  # `search -- -cat --library D`: after '--' nothing is an option
            after = args[args.index("--") + 1:] if "--" in args else []
            query = ctx.params.get("query")
            extra = after[1:] if after[:1] == [query] else after
            options = [i for i, a in enumerate(extra) if a.split("=", 1)[0] in names]  # not '-5' of "warm -5 degrees"
            if not exc.format_message().startswith("Got unexpected extra argument") or not options:
                raise
            words = extra[:options[0]]  # `-- a red car --library D`: the query's other words came first
            also = ", and a query of several words in quotes" if words else ""
            raise click.UsageError(f"{_clause(exc)}; options go before '--'{also}: "
                                   f"{ctx.command_path} [OPTIONS] -- {' '.join([query, *words])!r}", ctx) from None

        if "--" in args and any(isinstance(p, click.Argument) and p.name == "images" for p in self.params):
            # `rerank -- -car a.jpg --json`: after '--' an option is taken for an image file (unless one has its name)
            misplaced = [a for a in args[args.index("--") + 1:] if a.split("=", 1)[0] in names and not os.path.lexists(a)]
            if misplaced:
                raise click.UsageError(f"{misplaced[0]!r} after '--' would be read as an image; options go before '--': "
                                       f"{ctx.command_path} [OPTIONS] -- QUERY IMAGE...", ctx)

        def unspaced(value):
            return value[1:] if isinstance(value, str) and value.startswith(" -") and value[1:] in args else value

        for name, value in ctx.params.items():  # the query, and for `rerank` its images (a file named -5.jpg)
            ctx.params[name] = tuple(map(unspaced, value)) if isinstance(value, tuple) else unspaced(value)
        return rest


device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Where models run.")
dtype_option = click.option(
    "--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
    help="Model precision: auto = bf16 on CUDA (fp16 without bf16; never fp16 for Flan-T5), fp32 on CPU.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="blip2-search")
def main() -> None:
    """Find photos by describing them (BLIP-2 + FAISS)."""
    _quiet_libraries()


@main.command(cls=_QueryCommand)
@click.argument("query")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--model", default=DEFAULT_EMBEDDER, show_default=True, help="ITM checkpoint: hub id, local directory, or 'demo'.")
@device_option
@dtype_option
@json_option
def rerank(query, images, model, device, dtype, as_json):
    """Sort IMAGES by how well they match QUERY (BLIP-2 ITM logit + ITC cosine)."""
    from .api import rerank as run

    ranking = run(query, list(images), model=model, device=device, dtype=dtype)
    results = [{"path": h.path, "score": h.score, "itc": h.itc, "itm_logit": h.itm_logit, "match_probability": h.match_probability} for h in ranking]
    errors = [{"path": e.path, "error": e.error} for e in ranking.errors]
    if as_json:
        _emit({"query": ranking.query, "results": results, "errors": errors, **({"notes": list(ranking.notes)} if ranking.notes else {})})
    else:
        for note in ranking.notes:
            _note(note)
        for r in results:
            click.echo(f"{r['score']:8.4f}  itm={r['itm_logit']:7.3f}  p={r['match_probability']:.3f}  itc={r['itc']:.4f}  {one_line(r['path'])}")
    _report_unread(ranking.errors, len(images), as_json)


def _report_unread(errors, total: int, as_json: bool) -> None:
    """After the results: each unreadable input on stderr (text mode; JSON carries them), then exit 2."""
    if not errors:
        return
    if not as_json:
        for e in errors:
            click.echo(f"error: {e.error if one_line(e.path) in e.error else f'{one_line(e.path)}: {one_line(e.error)}'}", err=True)
    where = 'their "errors" entries' if as_json else "above"
    raise UserError(f"{len(errors)} of {total} images could not be read (see {where}); fix or leave them out and run again")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--captioner", default=DEFAULT_CAPTIONER, show_default=True, help="BLIP-2 generation checkpoint: hub id, local directory, or 'demo'.")
@click.option("--beams", default=1, show_default=True, type=click.IntRange(1, 16), help="Beam width (1 = greedy; LAVIS used 5).")
@click.option("--max-new-tokens", default=30, show_default=True, type=click.IntRange(1, 200))
@click.option("--prompt", default="", help="Text the caption continues, e.g. 'a photo of'.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 1024))
@device_option
@dtype_option
@json_option
def caption(images, captioner, beams, max_new_tokens, prompt, batch_size, device, dtype, as_json):
    """Write a caption for each of IMAGES."""
    from .api import caption as run
    from .models.captioner import Blip2Captioner, CaptionSettings

    settings = CaptionSettings(num_beams=beams, max_new_tokens=max_new_tokens, prompt=prompt)
    model = Blip2Captioner.load(captioner, device=device, dtype=dtype, batch_size=batch_size, settings=settings)
    out = run(list(images), model)
    if as_json:
        _emit({"results": [{"path": r.path, "caption": r.caption} for r in out.results], "errors": [{"path": e.path, "error": e.error} for e in out.errors]})
    else:
        for r in out.results:
            click.echo(f"{one_line(r.path)}\t{r.caption}")
    _report_unread(out.errors, len(images), as_json)


library_option = click.option(
    "--library", "library", default=None, type=click.Path(file_okay=False, path_type=str),
    help="Library folder [default: $BLIP2_SEARCH_LIBRARY or indexes/default].",
)


class _ProgressLine:
    """A one-line progress display on stderr, shown only on a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.start = None
        self.stage = "index"

    def __call__(self, p) -> None:
        import time

        if not self.enabled:
            return
        if p.stage != self.stage:  # a new stage: a new line, and its own rate
            if self.start:
                click.echo("", err=True)
            self.start, self.stage = None, p.stage
        self.start = self.start or time.perf_counter()
        rate = p.done / max(time.perf_counter() - self.start, 1e-9)
        if p.stage == "caption":
            click.echo(f"\rcaptioning photos indexed without captions: {p.done}/{p.total}  {rate:.1f} photos/s", nl=False, err=True)
        elif p.stage == "vit":
            click.echo(f"\rstoring the ViT tokens of photos indexed before --store-vit: {p.done}/{p.total}  {rate:.1f} photos/s", nl=False, err=True)
        else:
            click.echo(f"\r{p.done}/{p.total} files  indexed {p.indexed}  reused {p.reused}  failed {p.failed}  {rate:.1f} files/s", nl=False, err=True)

    def close(self) -> None:
        if self.enabled and self.start:
            click.echo("", err=True)


@main.command()
@click.argument("photo_dirs", nargs=-1, required=True, type=click.Path(path_type=str))
@library_option
@click.option("--model", default=None, help="Embedder for a new library [default: $BLIP2_SEARCH_MODEL or Salesforce/blip2-itm-vit-g]; 'demo' for the demo model.")
@click.option("--captioner", default=None, help="Caption model [default: the library's; new libraries: demo with --model demo, else $BLIP2_SEARCH_CAPTIONER or Salesforce/blip2-opt-2.7b]; 'none': stop captioning this library (captions written stay).")
@click.option("--no-captions", is_flag=True, help="Do not write captions in this run.")
@click.option("--reembed", is_flag=True, help="Re-embed every image of the library (all its folders) when --model differs from the library's.")
@click.option("--rehash", is_flag=True, help="Read and hash every file, also those with unchanged size and mtime (finds content replaced under the same size and time).")
@click.option("--store-vit", is_flag=True, help="Keep each image's ViT tokens (fp16; 0.72 MB an image for ViT-g) so reranking need not rerun the ViT.")
@click.option("--batch-size", default=None, type=click.IntRange(0, 4096), help="Images per model call [default: $BLIP2_SEARCH_BATCH_SIZE or 0 = auto: 32 on the CPU or with captions, 256 on a GPU].")
@click.option("--workers", default=None, type=click.IntRange(0, 256), help="Decode threads [default: $BLIP2_SEARCH_WORKERS or 0 = one per CPU core].")
@click.option("--vector-index", type=click.Choice(["exact", "compact", "auto"]), default=None,
              help="Search index: exact (all vectors in RAM, ~34 KB an image), compact (PQ codes, ~1.3 KB an image, top "
                   "candidates rescored exactly), auto (exact until it outgrows $BLIP2_SEARCH_VECTOR_MEMORY_GB, 4). "
                   "Recorded in the library [default: the library's; new libraries: $BLIP2_SEARCH_VECTOR_INDEX or auto].")
@device_option
@dtype_option
@json_option
def index(photo_dirs, library, model, captioner, no_captions, reembed, rehash, store_vit, batch_size, workers, vector_index, device, dtype, as_json):
    """Index PHOTO_DIRS into the library: new and changed files are embedded, moved ones keep their record."""
    from pathlib import Path

    from .indexing.scan import check_roots
    from .library import Library, default_library_path
    from .store.engine import METADATA_FILENAME

    if no_captions and captioner not in (None, "none"):
        raise UserError(f"--captioner {captioner} and --no-captions contradict each other; pass one of them")
    folder = Path(library).expanduser() if library is not None else default_library_path()
    if not (folder / METADATA_FILENAME).exists():  # before a library is made (an existing one says more of a missing folder)
        check_roots(photo_dirs, library=folder)
    progress = _ProgressLine(not as_json)
    try:
        with Library.open(library, model=model, captioner=captioner if captioner == "none" or not no_captions else False, create=True,
                          reembed=reembed, device=device, dtype=dtype, batch_size=batch_size, workers=workers, vector_index=vector_index) as lib:
            try:
                report = lib.index(photo_dirs, progress=progress, store_vit=store_vit, rehash=rehash)
            except IndexInterrupted as stop:  # what was committed is said, then exit 130 below
                report = stop.report
            finally:
                progress.close()
    except KeyboardInterrupt:  # before the run had counts (e.g. loading the model): a script reading stdout still gets JSON
        if as_json:
            _emit({"interrupted": True})
        raise
    for note in report.notes:
        _note(note)
    data = {k: getattr(report, k) for k in ("scanned", "indexed", "unchanged", "reused", "failed", "deleted", "seconds")}
    if as_json:
        _emit({**data, "interrupted": report.interrupted, "notes": list(report.notes)})
    else:
        click.echo("  ".join(f"{k} {v}" for k, v in data.items()))
    if report.interrupted:
        click.echo("interrupted: what was committed is kept; run the same command again to resume", err=True)
        sys.exit(130)


@main.command()
@library_option
@json_option
def status(library, as_json):
    """Counts of images, indexed, captioned, failed, deleted and pending photos, and the models on record."""
    from .library import Library

    with Library.open(library) as lib:
        st = lib.status()
    data = asdict(st)
    if as_json:
        _emit(data)
    else:
        width = max(map(len, data))
        for k, v in data.items():
            click.echo(f"{k:{width}}  {'none' if v is None else v}")  # as `--captioner none` writes it; JSON keeps null


@main.command()
@library_option
@click.option("--older-than", "older_than", default=None, type=click.FloatRange(min=0), metavar="DAYS",
              help="Only photos found deleted at least this many days ago [default: all deleted photos].")
@click.option("--missing", is_flag=True, help="First mark deleted every photo whose file is not on disk now, wherever it is "
              "(a drive gone for good); a disconnected drive's photos are forgotten too.")
@click.option("--missing-under", "missing_under", multiple=True, metavar="FOLDER", type=click.Path(path_type=str),
              help="As --missing, only for photos recorded under FOLDER (a drive or folder gone for good); repeatable.")
@json_option
def prune(library, older_than, missing, missing_under, as_json):
    """Forget photos deleted from disk: their records, vectors and ViT tokens go, and the library shrinks."""
    from .library import Library
    from .library.reports import NOT_COMPACTED

    if missing and missing_under:
        raise UserError("--missing and --missing-under contradict each other (--missing covers every folder); pass one of them")
    with Library.open(library) as lib:
        report = lib.prune(older_than, missing=list(missing_under) if missing_under else missing)
    for note in report.notes:
        _note(note)
    if as_json:
        _emit(asdict(report))
    else:
        if missing or missing_under:
            click.echo(f"marked {report.missing} photos deleted: their files are not on disk", err=True)
        click.echo(f"forgot {report.images} deleted photos, {report.embeddings} embeddings ({report.vectors} vectors) and "
                   f"{report.vit_files} ViT token files; metadata {_megabytes(report.bytes_before)} -> "
                   f"{_megabytes(report.bytes_after)}"
                   + ("" if report.compacted or not report.bytes_before or any(n.startswith(NOT_COMPACTED) for n in report.notes) else
                      " (not compacted: too little of it is free; indexing reuses that space)"))


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


@main.command()
@library_option
@json_option
def failures(library, as_json):
    """Files that could not be indexed, with the reason."""
    from .library import Library

    with Library.open(library) as lib:
        rows = [asdict(f) for f in lib.failures()]
    if as_json:
        _emit(rows)
    else:
        for r in rows:
            click.echo(f"{one_line(r['path'])}\t{one_line(r['error'])}")  # a reason recorded before messages were kept to one line


def _date_option(ctx, param, value):
    """--after / --before read as the library reads them, but a bad value is named by its option."""
    from .search.results import parse_date

    return parse_date(value, name=param.opts[0], end_of_day=param.name == "before")


@main.command(cls=_QueryCommand)
@click.argument("query", required=False)
@library_option
@click.option("-k", "k", default=10, show_default=True, type=int, help="How many results.")
@click.option("--rerank/--no-rerank", default=True, show_default=True, help="Rescore the top candidates with the ITM head (ITM logit + ITC).")
@click.option("--rerank-k", default=None, type=int, help="Candidates to rerank [default: 128 on GPU; on a CPU 16 when the ViT tokens are stored or the ViT is small, else no rerank].")
@click.option("--image", "image", default=None, type=click.Path(path_type=str), help="Search by example image instead of text.")
@click.option("--path", "path_glob", default=None, help="Only paths matching this glob, e.g. '*/2023/*' ('*' crosses '/'; a relative glob is taken from the current folder).")
@click.option("--after", default=None, callback=_date_option, help="Only photos taken on or after this date (YYYY-MM-DD, EXIF time).")
@click.option("--before", default=None, callback=_date_option, help="Only photos taken on or before this date (YYYY-MM-DD, EXIF time).")
@click.option("--min-score", default=None, type=float, help="Only results whose ITC cosine is at least this.")
@click.option("--sort", type=click.Choice(["score", "date"]), default="score", show_default=True)
@click.option("--fusion/--no-fusion", default=True, show_default=True, help="Also match the generated captions (reciprocal rank fusion).")
@click.option("--rerank-source", type=click.Choice(["auto", "stored", "recompute"]), default="auto", show_default=True,
              help="ViT tokens for reranking: stored by `index --store-vit`, or recomputed from the photo (auto: stored when kept).")
@click.option("--queries", "queries_file", default=None, type=click.File("rb"), help="Run one query per line (UTF-8); print one JSON object per line.")
@device_option
@dtype_option
@json_option
def search(query, library, k, rerank, rerank_k, image, path_glob, after, before, min_score, sort, fusion, rerank_source, queries_file, device, dtype, as_json):
    """Find photos matching QUERY (docs/queries.md: '"a dog" - "on a leash"', '2:"red circle" + "on the top"')."""
    from .library import Library

    if sum(x is not None for x in (query, image, queries_file)) != 1:
        raise UserError("give exactly one of QUERY, --image PATH or --queries FILE")
    if image is not None:  # text-only options are refused, not ignored
        ctx = click.get_current_context()
        given = [name for name, param, value in (("--rerank", "rerank", True), ("--rerank-k", "rerank_k", None),
                                                 ("--rerank-source", "rerank_source", None), ("--fusion", "fusion", True))
                 if ctx.get_parameter_source(param) == click.core.ParameterSource.COMMANDLINE and value in (None, ctx.params[param])]
        if given:
            raise UserError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to text queries only: an image search ranks by "
                            "its 32 query vectors, with no ITM rerank and no captions; leave it out")
    filters = dict(path=_absolute_glob(path_glob), after=after, before=before, min_score=min_score, sort=sort)
    with Library.open(library, device=device, dtype=dtype) as lib:
        if image is not None:
            _print_result(lib.similar(image, k, **filters), as_json)
        elif queries_file is not None:
            from .search.query import is_blank, parse_query

            failed = 0
            for number, line, bad in _text_lines(queries_file):
                if bad is not None:  # a bad line does not stop the others
                    failed += 1
                    _emit_line({"query": line, "line": number, "error": bad})
                    continue
                if is_blank(line):  # also a line of only invisible characters (a zero-width space): blank to the eye
                    continue
                try:
                    parse_query(line.strip())
                except Blip2SearchError as exc:
                    failed += 1
                    _emit_line({"query": line.strip(), "line": number, "error": str(exc)})
                    continue
                # anything else (an option, the library, the model) fails every line: stop at the first
                answer = lib.search(line.strip(), k, rerank=rerank, rerank_k=rerank_k, fusion=fusion, rerank_source=rerank_source, **filters).as_dict()
                _emit_line({"query": answer.pop("query"), "line": number, **answer})  # blank lines are skipped: the number maps it back
            if failed:
                raise UserError(f"{failed} quer{'y' if failed == 1 else 'ies'} of {queries_file.name} failed (their lines carry an \"error\"); fix those lines and run them again")
        else:
            _print_result(lib.search(query, k, rerank=rerank, rerank_k=rerank_k, fusion=fusion, rerank_source=rerank_source, **filters), as_json)


def _text_lines(file):
    """`(number, text, None)` for each line of a file opened in binary, as UTF-8 text (a leading BOM dropped);
    a line ends at LF, CRLF or a lone CR (old Mac files). A line that is not UTF-8 comes as
    `(number, text with the odd bytes replaced, reason and fix)`; a UTF-16/32 file is a UserError."""
    number = 0
    for raw in file:
        if (number == 0 and raw.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff"))) or b"\x00" in raw:
            raise UserError(f"{file.name} is UTF-16 or UTF-32 text (as PowerShell's > writes), not UTF-8; save it as UTF-8 "
                            "(e.g. Out-File -Encoding utf8, or iconv -f utf-16 -t utf-8)")
        body = raw[:-1] if raw.endswith(b"\n") else raw
        for part in (body[:-1] if body.endswith(b"\r") else body).split(b"\r"):
            number += 1
            try:
                yield number, part.decode("utf-8-sig" if number == 1 else "utf-8"), None
            except UnicodeDecodeError as exc:
                yield (number, part.decode("utf-8", "replace"),
                       f"line {number} of {file.name} is not UTF-8 text (byte 0x{part[exc.start]:02x}); save the file as UTF-8")


def _absolute_glob(glob: str | None) -> str | None:
    """Stored paths are absolute: a relative glob ('photos/2023/*') is taken from the current folder;
    one that starts with a wildcard ('*/2023/*') already matches anywhere. An empty one is no filter
    (as in the HTTP API), e.g. a script's unset variable."""
    if glob is None or not glob.strip():
        return None
    if glob[0] in "*?[":
        return glob
    return os.path.normpath(os.path.join(os.getcwd(), os.path.expanduser(glob)))


def _emit_line(data) -> None:
    click.echo(json.dumps(worded(data, _option)))


def _print_result(result, as_json: bool) -> None:
    if as_json:
        _emit(result.as_dict())
        return
    for note in result.notes:  # also why there are no results, and which were reranked when only some were
        _note(note)
    for h in result.hits:
        itm = f"  itm={h.itm_logit:6.3f}" if h.itm_logit is not None else ""
        date = f"  {h.taken_at:%Y-%m-%d}" if h.taken_at else ""
        cap = f"  \"{h.caption}\"" if h.caption else ""
        click.echo(f"{h.score:8.4f}  itc={h.itc:.4f}{itm}{date}  {one_line(h.path)}{cap}")


@main.command()
@library_option
@click.option("--threshold", default=0.95, show_default=True, type=float, help="Image-to-image score (0-1] at which two photos count as near duplicates.")
@json_option
def duplicates(library, threshold, as_json):
    """Groups of near-duplicate photos."""
    from .library import Library

    with Library.open(library) as lib:
        groups = lib.duplicates(threshold)
    data = [[{"id": p.id, "path": p.path, "score": p.score} for p in g] for g in groups]
    for note in groups.notes:
        _note(note)
    if as_json:
        _emit(data)
        return
    if not data and not groups.notes:  # else lowering the threshold is not the fix the notes name
        click.echo(f"no near-duplicates at --threshold {threshold:g} (lower it, e.g. {_looser(threshold):g}, to find looser matches)", err=True)
    elif not data:
        click.echo(f"no near-duplicates at --threshold {threshold:g} among the photos compared", err=True)
    for g in data:  # each photo with its best score with another photo of the group
        click.echo("\n".join(f"{p['score']:.4f}  {one_line(p['path'])}" for p in g) + "\n")


def _looser(threshold: float) -> float:
    """A duplicates threshold to suggest where `threshold` found none: below it, and at most 0.9."""
    return float(f"{max(min(0.9, threshold - 0.05), threshold / 2):.3g}")


@main.command()
@click.option("--dir", "folder", default="indexes/demo", show_default=True, type=click.Path(file_okay=False, path_type=str), help="Where to write the photos and the library.")
@click.option("--photos", "n_photos", default=144, show_default=True, type=click.IntRange(1, 5000), help="How many synthetic photos to render.")
def demo(folder, n_photos):
    """Render synthetic photos, index them with the demo models and show a few searches (offline)."""
    from pathlib import Path

    from .demo.showcase import run_demo

    r = run_demo(Path(folder), n_photos=n_photos)
    click.echo(f"rendered {n_photos} photos into {r.photos}; indexed {r.indexed} into {r.library} in {r.index_seconds:.1f} s")
    for q in r.queries:
        click.echo(f"\nsearch {q.query}")
        for path, caption, score, scene in q.hits:
            truth = f"  (rendered as: {scene.caption})" if scene else ""
            click.echo(f"  {score:7.3f}  {Path(path).name}  caption: {caption}{truth}")
    click.echo(f"\n{len(r.queries)} searches in {r.search_seconds:.2f} s. Try: blip2-search search \"a purple square on the right\" --library {r.library}")


@main.command("eval")
@click.argument("annotations", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--images", "images_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=str), help="Folder the annotation image paths are relative to.")
@click.option("--model", default=DEFAULT_EMBEDDER, show_default=True, help="ITM checkpoint: hub id, local directory, or 'demo'.")
@click.option("--rerank-k", default=128, show_default=True, type=click.IntRange(1, None), help="Candidates per query rescored by ITM (the paper used 128).")
@click.option("--split", default="test", show_default=True, help="Karpathy split to evaluate (ignored for LAVIS annotation lists).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096))
@device_option
@dtype_option
@json_option
def eval_(annotations, images_dir, model, rerank_k, split, batch_size, device, dtype, as_json):
    """Image-text retrieval recall with BLIP-2's protocol (ITC, then ITM rerank of the top k)."""
    from pathlib import Path

    from .evaluation import evaluate, load_annotations
    from .models.encoder import Blip2Encoder

    data = load_annotations(Path(annotations), Path(images_dir), split=split)
    report = evaluate(Blip2Encoder.load(model, device=device, dtype=dtype, batch_size=batch_size), data, rerank_k=rerank_k)
    if as_json:
        _emit(report.as_dict())
        return
    d = report.as_dict()
    click.echo(f"{report.n_images} images, {report.n_texts} texts, rerank k={rerank_k}")
    click.echo(f"{'':10}{'TR@1':>8}{'TR@5':>8}{'TR@10':>8}{'IR@1':>8}{'IR@5':>8}{'IR@10':>8}{'mean':>8}")
    for name, r in (("ITC", d["itc"]), ("ITC+ITM", d)):
        click.echo(f"{name:10}" + "".join(f"{r[k]:8.2f}" for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")))
    click.echo("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in report.timings.items()))


@main.command()
@library_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; anything but loopback needs --token.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(1, 65535), help="TCP port.")
@click.option("--token", default=None, envvar="BLIP2_SEARCH_TOKEN", help="Require this token on every API call (Bearer header, or /?token= once in a browser) [env: BLIP2_SEARCH_TOKEN].")
@device_option
@dtype_option
def serve(library, host, port, token, device, dtype):
    """Serve the search API and web page (docs/server.md) with the models kept loaded."""
    try:
        from .server import bind_socket, check_bind, serve as run
    except ImportError as exc:
        raise UserError(f"the server needs FastAPI and uvicorn ({exc.name} is missing); pip install 'blip2-search[server]'") from None
    from .library import Library

    from_env = click.get_current_context().get_parameter_source("token") == click.core.ParameterSource.ENVIRONMENT
    check_bind(host, token, "BLIP2_SEARCH_TOKEN" if from_env else "--token")
    with bind_socket(host, port) as sock, Library.open(library, device=device, dtype=dtype) as lib:
        shown = f"[{host}]" if ":" in host else host
        login = " (open /?token=TOKEN once in a browser)" if token else ""
        try:
            run(lib, host=host, port=port, token=token, sock=sock,
                ready=lambda: click.echo(f"serving {lib.folder} on http://{shown}:{port}/{login}", err=True))
        except KeyboardInterrupt:  # Ctrl-C (or SIGTERM, which serve raises as this) is how a server is stopped: a normal end
            click.echo("stopped", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
