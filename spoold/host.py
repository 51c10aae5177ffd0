"""The config checked against this host: what parsing (spoold.config, pure) leaves to it.

Socket groups are looked up through NSS (maybe LDAP, so it may be slow); AWS profiles and the
region chain are read as botocore reads them (the environment, the shared files, systemd
credentials), never over the network; the default role session name is the host's name; socket
paths are compared after following symlinks. ``check-config``, ``run`` and a reload call
resolve(); its ConfigErrors name the file and the key, as parsing does.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import re
import socket as stdsocket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spoold.config import Config, Destination, aws_endpoint, default_session_name
from spoold.errors import ConfigError


def resolve(cfg: Config, environ: Mapping[str, str] | None = None) -> Config:
    """``cfg`` checked against this host (``environ``: os.environ by default), with the
    regions, endpoints and role session names it gives filled in; else a ConfigError."""
    env = dict(os.environ if environ is None else environ)
    dests = tuple(_resolve_destination(cfg.path, d, env) for d in cfg.destinations)
    _check_socket_paths(cfg)
    return dataclasses.replace(cfg, destinations=dests)


def _resolve_destination(path: Path, dest: Destination, env: dict[str, str]) -> Destination:
    def error(key: str, message: str) -> ConfigError:
        return ConfigError(f'{path}: destination "{dest.name}": {key}: {message}')

    creds = dest.credentials
    if creds.profile is not None:
        try:
            check_profile(creds.profile, env)
        except ValueError as exc:
            raise error("profile", str(exc)) from None
    if dest.socket is not None and dest.socket.group is not None:
        try:
            group_id(dest.socket.group)
        except (KeyError, ValueError):
            raise error("socket_group", f"no group {dest.socket.group!r} on this host") from None
    if creds.role_arn is not None and creds.role_session_name is None:
        creds = dataclasses.replace(creds, role_session_name=default_session_name(stdsocket.gethostname()))
    region, endpoint_url = dest.region, dest.endpoint_url
    if not region:
        region = default_region(env, creds.profile) or ""
        if not region:
            raise error("region", "required: set it here or in AWS_REGION / AWS_DEFAULT_REGION / the AWS config")
        endpoint_url = endpoint_url or aws_endpoint(dest.kind, region)
    return dataclasses.replace(dest, region=region, endpoint_url=endpoint_url, credentials=creds)


def _check_socket_paths(cfg: Config) -> None:
    """A socket path must name nothing else the daemon owns: replacing a stale socket there, or
    unlinking it at shutdown, would destroy the spool (acknowledged lines) or another socket."""
    spool = cfg.spool.path

    def beside(suffix: str) -> str:
        return os.path.realpath(spool.with_name(spool.name + suffix))

    taken = {
        os.path.realpath(spool): "the spool file ([spool].path)",
        beside("-wal"): 'the spool\'s WAL ([spool].path + "-wal")',
        beside("-shm"): 'the spool\'s shared-memory file ([spool].path + "-shm")',
        beside(".lock"): 'the spool\'s lock file ([spool].path + ".lock")',
    }
    sockets = [("[control].socket", "the control socket ([control].socket)", cfg.control_socket)]
    sockets += [(f'destination "{d.name}": socket', f'the socket of destination "{d.name}"', d.socket.path)
                for d in cfg.destinations if d.socket is not None]
    for key, description, sock in sockets:
        if sock is None:
            continue
        where = os.path.realpath(sock)
        if where in taken:
            raise ConfigError(f"{cfg.path}: {key}: {sock} is also {taken[where]}; choose another path")
        taken[where] = description


def group_id(group: str) -> int:
    """The id of a group given by name or number; KeyError (or ValueError, for a name that
    cannot be one, e.g. with a NUL) when no such group exists."""
    if re.fullmatch(r"[0-9]+", group):
        return int(group)
    return grp.getgrnam(group).gr_gid


def check_profile(profile: str, env: Mapping[str, str]) -> None:
    """ValueError unless the profile is in the shared config or credentials file (read as
    botocore reads them, systemd credentials included); so must the source_profile it names,
    and a profile that assumes a role needs a region for STS."""
    import botocore.configloader
    from botocore.exceptions import BotoCoreError

    from spoold.signing import shared_files

    config_file, credentials_file = shared_files(env)
    profiles: dict[str, dict[str, Any]] = {}
    try:
        found = []
        if config_file.is_file():
            found.append(botocore.configloader.load_config(str(config_file)).get("profiles", {}))
        if credentials_file.is_file():
            found.append(botocore.configloader.raw_config_parse(str(credentials_file)))
    except (BotoCoreError, OSError) as exc:
        raise ValueError(f"cannot read the AWS shared files: {exc}") from None
    for doc in found:
        for name, values in doc.items():
            profiles.setdefault(name, {}).update(values if isinstance(values, dict) else {})
    where = f"{config_file} or {credentials_file}"
    if profile not in profiles:
        raise ValueError(f"no profile {profile!r} in {where}")
    source = profiles[profile].get("source_profile")
    if isinstance(source, str) and source not in profiles:
        raise ValueError(f"profile {profile!r} names source_profile {source!r}, which is not in {where}")
    if "role_arn" in profiles[profile] and not profiles[profile].get("region") and not env.get("AWS_DEFAULT_REGION"):
        # botocore asks STS in the profile's region and stops with NoRegionError without one.
        raise ValueError(f"profile {profile!r} assumes a role: give it a region (region = ...) "
                         "or set AWS_DEFAULT_REGION")


def default_region(env: Mapping[str, str], profile: str | None = None) -> str | None:
    """The region of the AWS chain: AWS_REGION, AWS_DEFAULT_REGION, then the shared config
    file (the profile's own, if any), as the AWS CLI reads them."""
    for key in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if env.get(key):
            return env[key]
    try:
        import botocore.session

        region = botocore.session.Session(profile=profile).get_config_variable("region")
    except Exception:  # a broken ~/.aws/config must not hide the real message
        return None
    return str(region) if region else None
