"""`fleetsim keys ...`: CURVE keys for the control bus."""

from __future__ import annotations

from pathlib import Path

import click

from fleetsim.cli.common import (
    EXIT_USAGE,
    cli,
    emit,
    fail,
    json_option,
    option,
)

# -- keys -----------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """CURVE keys for a control bus bound beyond loopback."""


@keys.command("generate")
@option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="Where to write the keys (default: <run dir>/keys).")
@option("--force", is_flag=True, help="Replace existing keys.")
@json_option
@click.pass_context
def keys_generate(ctx: click.Context, directory: Path | None, force: bool,
                  as_json: bool) -> None:
    """Create the coordinator's and the clients' keypairs (files 0600).

    Then `fleetsim up --bus-host 0.0.0.0 --bus-keys DIR`; pods and CLI commands
    on other hosts need a copy of DIR (the client keys and the server's public key).
    """
    from fleetsim.bus.security import generate_keys, key_files

    target = directory or ctx.obj["run_dir"].ensure().path / "keys"
    if key_files(target).server_secret.exists() and not force:
        # Checked here so the advice names this command's option.
        fail(f"CURVE keys already exist in {target} (use --force to replace them)", EXIT_USAGE)
    files = generate_keys(target, overwrite=force)
    emit({"directory": str(files.directory)}, as_json,
         lambda: click.echo(f"keys written to {files.directory}"))
