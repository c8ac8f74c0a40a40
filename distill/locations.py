"""Where weights and artifacts come from, as a config writes them: hub ids, weights sources, endpoints.

Only the form is checked here (no file system, no network): `distill.preflight` checks that a
path exists before training.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from distill.errors import ConfigError

HUB = "hub:"


def hub_id(source: str | None) -> str | None:
    """The hub id of a weights source written `hub:<org>/<name>`, else None."""
    return source[len(HUB):] if source and source.startswith(HUB) else None


def check_weights_source(source: str, key: str, roles: tuple[str, ...] = ()) -> None:
    """A source of weights is a role's name (when `roles` are given), `hub:<id>`, an s3:// URI or a local
    path; a bare word that names no role is refused rather than looked up on the hub (a typo took 38 s
    to fail there). Whether a path exists is checked before training (`distill.preflight`)."""
    if source in roles or source.startswith("s3://"):
        return
    if source.startswith(HUB):
        if not hub_id(source).strip():
            raise ConfigError(f"{key}: {HUB} needs a hub id, e.g. hub:Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
        return
    if "://" in source:
        raise ConfigError(f"{key}: {source!r} has an unsupported scheme; give a local folder, an s3:// URI or hub:<id>")
    if "/" not in source and source not in (".", ".."):
        role = f"a role ({', '.join(roles)}), " if roles else ""
        raise ConfigError(f"{key}: {source!r} is not {role}a path or a hub id; write a folder here as "
                          f"./{source} and a hub model as hub:<org>/<name>")


def check_endpoint_url(url: str, key: str) -> None:
    """http(s)://host[:port][/path], with no user or password in it: those would be echoed in errors and
    stored in the run's config.yaml. The message never repeats a URL that holds credentials."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise ConfigError(f"{key}: the URL holds a user name or password; give the endpoint alone "
                          f"(http://host:port) and the credentials through the AWS chain (AWS_ACCESS_KEY_ID / "
                          f"AWS_SECRET_ACCESS_KEY, ~/.aws, an instance role)")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: expected http(s)://host[:port], got {url!r}")
