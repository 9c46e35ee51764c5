"""`certfleet keys ...`: the factory PKI."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from certfleet.fleet import pki_admin
from certfleet.fleet.pki_admin import CaInfo, HsmSpec
from certfleet.pki.hierarchy import ServerNames

from .common import (
    CertfleetGroup,
    console,
    database_option,
    default_database,
    pki_option,
    print_json,
    run,
)


def _hsm_options(fn: click.decorators.FC) -> click.decorators.FC:
    for option in reversed(
        [
            click.option(
                "--hsm-module", metavar="PATH", help="PKCS#11 module holding the root key."
            ),
            click.option(
                "--hsm-pin",
                metavar="PIN",
                envvar="CERTFLEET_HSM_PIN",
                help="Token user PIN (or set CERTFLEET_HSM_PIN).",
            ),
            click.option("--hsm-token-label", metavar="LABEL", help="Label of the token."),
            click.option(
                "--hsm-key-label",
                default="factory-root",
                show_default=True,
                help="Label of the root key object on the token.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def _passphrase_option(fn: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--root-passphrase-file",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="File holding the passphrase that protects root.key.",
    )(fn)


def _root_signing_options(fn: click.decorators.FC) -> click.decorators.FC:
    """What every command that signs with the root key takes."""
    for option in reversed(
        [
            pki_option,
            database_option,
            click.option(
                "--factory", help="Factory name; needed only when the store holds several."
            ),
            click.option(
                "--hsm-pin", metavar="PIN", envvar="CERTFLEET_HSM_PIN", help="Root token PIN."
            ),
            _passphrase_option,
        ]
    ):
        fn = option(fn)
    return fn


def _hsm_spec(module: str | None, pin: str | None, token: str | None, key: str) -> HsmSpec | None:
    if not (module or token):
        return None
    if not (module and token):
        raise click.UsageError("--hsm-module and --hsm-token-label go together")
    return HsmSpec(module=module, token_label=token, pin=pin, key_label=key)


def _passphrase(path: Path | None) -> bytes | None:
    return path.read_bytes().strip() if path else None


@click.group(cls=CertfleetGroup)
def keys() -> None:
    """Factory PKI: root of trust, device CAs and server certificates."""


@keys.group(cls=CertfleetGroup)
def ca() -> None:
    """The factory's certificate authorities."""


@ca.command("create")
@click.argument("pki_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--factory", required=True, help="Factory name (the OU of every certificate).")
@click.option("--gateway-dns", multiple=True, help="Gateway host name (repeatable).")
@click.option("--gateway-ip", multiple=True, help="Gateway IP address (repeatable).")
@click.option("--est-dns", multiple=True, help="EST server host name; default: the gateway's.")
@click.option("--est-ip", multiple=True, help="EST server IP address; default: the gateway's.")
@click.option("--curve", type=click.Choice(["P-256", "P-384"]), default="P-256", show_default=True)
@_hsm_options
@_passphrase_option
@database_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def ca_create(
    pki_dir: Path,
    factory: str,
    gateway_dns: tuple[str, ...],
    gateway_ip: tuple[str, ...],
    est_dns: tuple[str, ...],
    est_ip: tuple[str, ...],
    curve: str,
    hsm_module: str | None,
    hsm_pin: str | None,
    hsm_token_label: str | None,
    hsm_key_label: str,
    root_passphrase_file: Path | None,
    database: str | None,
    as_json: bool,
) -> None:
    """Create the root of trust, device CAs and TLS certificates in PKI_DIR (once)."""
    names = ServerNames(list(gateway_dns), list(gateway_ip), list(est_dns), list(est_ip))
    created = run(
        pki_admin.create_factory,
        database or default_database(pki_dir),
        pki_dir,
        factory,
        names,
        curve=curve,
        hsm=_hsm_spec(hsm_module, hsm_pin, hsm_token_label, hsm_key_label),
        passphrase=_passphrase(root_passphrase_file),
    )
    show_cas(created, as_json, title=f"Factory {factory} created in {pki_dir}")


@ca.command("show")
@pki_option
@database_option
@click.option("--factory", help="Factory name; needed only when the store holds several.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--pretty", is_flag=True, help="Also print each certificate's details.")
def ca_show(
    pki_dir: Path, database: str | None, factory: str | None, as_json: bool, pretty: bool
) -> None:
    """Show the hierarchy: subjects, fingerprints, validity, status."""
    cas = run(pki_admin.list_cas, database or default_database(pki_dir), factory)
    show_cas(cas, as_json, title="Factory PKI", pretty=pretty)


@ca.command("add-device-ca")
@click.argument("pem", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@pki_option
@database_option
@click.option("--factory", help="Factory name; needed only when the store holds several.")
def ca_add(pem: Path, pki_dir: Path, database: str | None, factory: str | None) -> None:
    """Trust another offline device CA (its certificate must chain to the root)."""
    info = run(pki_admin.add_device_ca, database or default_database(pki_dir), pem, factory)
    console.print(f"added device CA [bold]{info.name}[/bold] ({info.subject}), {info.sha256[:16]}…")


@ca.command("disable-device-ca")
@click.argument("name")
@pki_option
@database_option
@click.option("--factory", help="Factory name; needed only when the store holds several.")
def ca_disable(name: str, pki_dir: Path, database: str | None, factory: str | None) -> None:
    """Stop registering or renewing devices of CA NAME (its devices keep connecting)."""
    info = run(pki_admin.disable_device_ca, database or default_database(pki_dir), name, factory)
    console.print(
        f"device CA {info.name} disabled: it registers and renews no devices; "
        "its devices keep connecting until their certificates are rotated"
    )


@ca.command("revoke-device-ca")
@click.argument("name")
@pki_option
@database_option
@click.option("--factory", help="Factory name; needed only when the store holds several.")
@_hsm_options
@_passphrase_option
def ca_revoke(
    name: str,
    pki_dir: Path,
    database: str | None,
    factory: str | None,
    hsm_module: str | None,
    hsm_pin: str | None,
    hsm_token_label: str | None,
    hsm_key_label: str,
    root_passphrase_file: Path | None,
) -> None:
    """Refuse every device whose certificate CA NAME issued; writes a root-signed CRL."""
    result = run(
        pki_admin.revoke_device_ca,
        database or default_database(pki_dir),
        pki_dir,
        name,
        factory,
        pin=hsm_pin,
        passphrase=_passphrase(root_passphrase_file),
    )
    console.print(f"device CA {result.ca.name} revoked; CRL written to {result.crl_path}")
    console.print(f"{len(result.affected_devices)} device(s) had certificates from it:")
    for device_uuid in result.affected_devices:
        console.print(f"  {device_uuid}", markup=False)


@ca.command("new-local-ca")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@_root_signing_options
def ca_new_local(
    out_dir: Path,
    pki_dir: Path,
    database: str | None,
    factory: str | None,
    hsm_pin: str | None,
    root_passphrase_file: Path | None,
) -> None:
    """Make a further offline device CA for manufacturing; its key goes to OUT_DIR."""
    info = run(
        pki_admin.new_local_ca,
        database or default_database(pki_dir),
        pki_dir,
        out_dir,
        factory,
        pin=hsm_pin,
        passphrase=_passphrase(root_passphrase_file),
    )
    console.print(f"new offline device CA [bold]{info.name}[/bold] written to {out_dir}")


@ca.command("new-online-ca")
@_root_signing_options
def ca_new_online(
    pki_dir: Path,
    database: str | None,
    factory: str | None,
    hsm_pin: str | None,
    root_passphrase_file: Path | None,
) -> None:
    """Replace the online CA that issues device certificates (e.g. after its key leaked)."""
    info, replaced = run(
        pki_admin.new_online_ca,
        database or default_database(pki_dir),
        pki_dir,
        factory,
        pin=hsm_pin,
        passphrase=_passphrase(root_passphrase_file),
    )
    console.print(
        f"new online CA [bold]{info.name}[/bold] issues device certificates from now on "
        "(running servers switch within seconds)",
        soft_wrap=True,
    )
    if replaced is not None:
        console.print(
            f"{replaced.name} stays trusted until you revoke it; move its devices first:\n"
            f"  certfleet campaigns create --reissue-from-ca {replaced.name} --to-ca {info.name} "
            "--reason ...",
            markup=False,
            soft_wrap=True,
        )


@keys.group(cls=CertfleetGroup)
def est() -> None:
    """The EST server's TLS identity."""


@est.command("authorize")
@_root_signing_options
@click.option("--est-dns", multiple=True, help="EST server host name (repeatable).")
@click.option("--est-ip", multiple=True, help="EST server IP address (repeatable).")
def est_authorize(
    pki_dir: Path,
    database: str | None,
    factory: str | None,
    est_dns: tuple[str, ...],
    est_ip: tuple[str, ...],
    hsm_pin: str | None,
    root_passphrase_file: Path | None,
) -> None:
    """Issue (or replace) the EST server's TLS certificate, signed by the root."""
    info = run(
        pki_admin.est_authorize,
        database or default_database(pki_dir),
        pki_dir,
        factory,
        list(est_dns),
        list(est_ip),
        pin=hsm_pin,
        passphrase=_passphrase(root_passphrase_file),
    )
    console.print(f"EST TLS certificate issued for {info.subject}, valid until {info.not_after}")


def show_cas(cas: list[CaInfo], as_json: bool, title: str, pretty: bool = False) -> None:
    if as_json:
        print_json([ca.as_dict() for ca in cas])
        return
    table = Table(title=title)
    for column in ("name", "kind", "status", "valid until", "key", "sha256", "subject"):
        table.add_column(column, no_wrap=column != "subject")
    for info in cas:
        table.add_row(
            info.name,
            info.kind,
            info.status,
            info.not_after.date().isoformat(),
            info.key_location,
            info.sha256[:12] + "…",
            info.subject,
        )
    console.print(table)
    if pretty:
        for info in cas:
            console.print(f"\n[bold]{info.name}[/bold]\n{info.details()}", highlight=False)
