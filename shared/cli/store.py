"""``boxrefine store info PATH``: what a feature store holds and what made it."""

from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from boxrefine.shared.cli.common import one_line_errors
from boxrefine.shared.console import console

app = typer.Typer(help="Inspect feature stores.", no_args_is_help=True)


def _human(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@app.command("info")
@one_line_errors
def info(path: str = typer.Argument(..., help="Store path or fsspec URL.")) -> None:
    """Model, checkpoint, dtype, codec, rows complete/total per split, size, bad images."""
    from boxrefine.shared.store import STATE_BAD, STATE_COMPLETE, STATE_STALE, open_store

    store = open_store(path)
    a, ident = store.attrs, store.identity
    ck = a.get("checkpoint", {})
    st = a.get("storage", {})
    console.print(f"[bold]{path}[/bold]  (boxrefine schema {a['boxrefine']['schema_version']}, "
                  f"written by {a['boxrefine'].get('tool_version')})")
    console.print(f"model      {ident.model_type}, input {ident.img_size}px, encoder {ident.encoder_precision}")
    weights = ck.get("official_name") or ck.get("path") or "—"
    console.print(f"checkpoint {ident.checkpoint}  {weights}"
                  + ("  [bold yellow](random init: tests/demo only)[/bold yellow]"
                     if ident.checkpoint.startswith("random-init") else ""))
    console.print(f"storage    {st.get('dtype')} (numpy {st.get('numpy_dtype')}), codec {st.get('codec')} "
                  f"clevel {st.get('clevel')}, GT masks {ident.gt_mask_size}x{ident.gt_mask_size}")
    signal = a.get("signal_store")
    if signal:
        console.print(Text(f"signal     GT written into image_embeddings (copy of {signal.get('source')}, gain "
                           f"{signal.get('gain')}): for checking that a recipe learns, not for real results",
                           style="bold yellow"))
    table = Table("split", "complete", "total", "bad", "stale", "annotations sha256")
    bad_all = {}
    total_complete = 0
    for name in store.splits:
        sp = store.split(name)
        rows = sp.read_rows()
        states = rows[:, 0] if len(rows) else rows
        n_done = int((states == STATE_COMPLETE).sum())
        total_complete += n_done
        ann = sp.group.attrs.get("annotations", {})
        table.add_row(name, str(n_done), str(sp.n_rows), str(int((states == STATE_BAD).sum())),
                      str(int((states == STATE_STALE).sum())), str(ann.get("sha256", ""))[:12])
        bad_all.update({(name, k): v for k, v in sp.bad_images().items()})
    console.print(table)
    size = store.bytes_on_disk()
    per = (size / total_complete) if (size and total_complete) else None
    console.print(f"on disk    {_human(size)}" + (f", {_human(per)} per complete image" if per else ""))
    if bad_all:
        console.print(f"bad images ({len(bad_all)}):")
        for (name, _), rep in sorted(bad_all.items(), key=lambda kv: (kv[0][0], kv[1]["file"])):
            console.print(f"  {name}: {rep['file']}: {rep['reason']}", markup=False)
