"""`python -m xmoe data ...`: preprocess JSONL into Megatron datasets, make the sample, inspect.

A thin click layer over `preprocess`, `make_sample_dataset` and `IndexedDataset`; every user
mistake is one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
import time
from functools import wraps

import click

from xmoe.data.errors import DataError


def _one_line_errors(fn):
    @wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DataError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return run


class _Progress:
    """Progress on stderr: redrawn in place on a terminal, a line every few seconds otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, stats) -> None:
        now = time.monotonic()
        if self.quiet or now - self.last < (0.5 if self.tty else 5.0):
            return
        self.last = now
        line = (
            f"{stats.bytes_read / 1e6:9.1f} MB  {stats.mb_per_s:6.2f} MB/s  "
            f"{stats.documents} docs  {stats.empty} empty  {stats.malformed} malformed"
        )
        click.echo(("\r" + line) if self.tty else line, err=True, nl=not self.tty)

    def done(self) -> None:
        if self.tty and not self.quiet and self.last:
            click.echo("", err=True)


@click.group("data")
def data() -> None:
    """Prepare training data (Megatron-LM .bin/.idx indexed datasets)."""


@data.command()
@click.option(
    "--input", "inputs", multiple=True, required=True, help="JSONL file (.gz/.zst ok); repeatable."
)
@click.option("--output-prefix", required=True, help="Writes PREFIX.bin and PREFIX.idx.")
@click.option(
    "--tokenizer", default="byte", show_default=True, help="byte | hf:tokenizer.json | gpt2:DIR"
)
@click.option(
    "--json-key", default="text", show_default=True, help="Field holding each document's text."
)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 256))
@click.option("--append-eod/--no-append-eod", default=True, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing PREFIX.bin/.idx.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@_one_line_errors
def preprocess(
    inputs, output_prefix, tokenizer, json_key, workers, append_eod, force, quiet
) -> None:
    """Tokenize JSONL documents into a Megatron indexed dataset."""
    from xmoe.data.preprocess import preprocess as run

    progress = _Progress(quiet)
    stats = run(
        list(inputs), output_prefix, tokenizer, json_key, workers, append_eod, force, progress
    )
    progress.done()
    click.echo(f"wrote {output_prefix}.bin/.idx: {stats.summary()}")


@data.command()
@click.option("--output-prefix", default="data/stories", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing PREFIX.bin/.idx.")
@_one_line_errors
def sample(output_prefix, force) -> None:
    """Write the shipped sample corpus as a byte-tokenized dataset."""
    from xmoe.data.sample import make_sample_dataset

    stats = make_sample_dataset(output_prefix, force)
    click.echo(f"wrote {output_prefix}.bin/.idx: {stats.summary()}")
    click.echo(
        f"train on it with: --set data.source=indexed --set data.path={output_prefix} "
        "(or simply --set data.source=sample)"
    )


@data.command()
@click.argument("prefix")
@click.option(
    "--show", default=0, show_default=True, help="Print the first N documents' token ids."
)
@_one_line_errors
def inspect(prefix, show) -> None:
    """Check an indexed dataset and print its size."""
    from xmoe.data.indexed import IndexedDataset

    ds = IndexedDataset(prefix)
    lengths = ds.sequence_lengths
    click.echo(
        f"{prefix}: {ds.num_documents} documents, {len(ds)} sequences, {ds.num_tokens} tokens "
        f"({ds.dtype}); sequence length min {lengths.min()} mean {lengths.mean():.1f} max {lengths.max()}"
    )
    for i in range(min(show, len(ds))):
        click.echo(f"{i}: {ds[i].tolist()}")


if __name__ == "__main__":
    data()
