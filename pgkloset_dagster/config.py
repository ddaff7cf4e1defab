"""pgkloset.yaml: klosets and servers, validated with messages naming the key and its line.

The file is found through ``PGKLOSET_CONFIG`` or as ``pgkloset.yaml`` in the
working directory. Secrets never appear in it: a kloset names the environment
variable holding its passphrase, a server the one holding its DSN.

Loading is forgiving on purpose: one broken server must not take the other
servers' backups off the schedule. A problem that concerns one kloset or one
server removes just that entry and is reported as a ``Problem``; only a file
that cannot be read or parsed at all raises ``ConfigError``.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from pgkloset_core.errors import KlosetError
from pgkloset_core.kloset.retention import RetentionPolicy, parse_duration

CONFIG_ENV = "PGKLOSET_CONFIG"
CONFIG_NAME = "pgkloset.yaml"
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

KLOSET_KEYS = ("url", "passphrase_env", "lock_wait", "create_if_missing", "prune")
PRUNE_KEYS = ("grace", "max_repack_ratio")
SERVER_KEYS = ("dsn_env", "kloset", "databases", "exclude", "bin_dir", "schedule",
               "retention", "drill", "freshness", "physical")
SCHEDULE_KEYS = ("logical", "physical", "timezone")
DRILL_KEYS = ("enabled", "isolate", "sql_checks")
SQL_CHECK_KEYS = ("name", "sql", "database")
FRESHNESS_KEYS = ("fail", "warn")
PHYSICAL_KEYS = ("enabled", "fast_checkpoint")
TOP_KEYS = ("klosets", "servers")


class ConfigError(KlosetError):
    """pgkloset.yaml cannot be read or parsed at all."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the config; ``severity`` is "error" (entry skipped) or "warning"."""

    message: str
    severity: str = "error"
    subject: str = ""  # "server prod", "kloset main" or ""

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class SqlCheckConfig:
    name: str
    sql: str
    database: str | None = None


@dataclass(frozen=True)
class KlosetConfig:
    name: str
    url: str
    passphrase_env: str
    lock_wait: float = 60.0
    create_if_missing: bool = False
    prune_grace: float = 3600.0
    max_repack_ratio: float = 0.25


@dataclass(frozen=True)
class ServerConfig:
    name: str
    dsn_env: str
    kloset: str
    databases: tuple[str, ...] | None  # None: every database ("all")
    exclude: tuple[str, ...] = ()
    bin_dir: str | None = None
    logical_cron: str | None = None
    physical_cron: str | None = None
    timezone: str = "UTC"
    retention: RetentionPolicy | None = None
    drill_enabled: bool = True
    drill_isolate: bool = True
    sql_checks: tuple[SqlCheckConfig, ...] = ()
    freshness_fail: timedelta | None = None
    freshness_warn: timedelta | None = None
    physical: bool = True
    fast_checkpoint: bool = False


@dataclass
class PgKlosetConfig:
    """The loaded config: what is usable, and everything that was wrong."""

    klosets: dict[str, KlosetConfig] = field(default_factory=dict)
    servers: dict[str, ServerConfig] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    source: str = "<embedded>"


# ---------------------------------------------------------------- YAML with lines


class _Node:
    """A YAML value with the line it starts on (1-based)."""

    def __init__(self, value: Any, line: int) -> None:
        self.value = value
        self.line = line


def _convert(node: yaml.Node) -> _Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, _Node] = {}
        keys: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(_scalar(key_node))
            if key in out:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} given twice "
                                  f"(first on line {keys[key]})")
            keys[key] = key_node.start_mark.line + 1
            out[key] = _convert(value_node)
        return _Node(out, line)
    if isinstance(node, yaml.SequenceNode):
        return _Node([_convert(n) for n in node.value], line)
    return _Node(_scalar(node), line)


def _scalar(node: yaml.Node) -> Any:
    """A node's value; unknown tags and invalid dates are errors of the file, not tracebacks."""
    try:
        return yaml.safe_load(yaml.serialize(node))
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"line {node.start_mark.line + 1}: {problem}") from None


class _Invalid(Exception):
    """One bad value: the message already names the key and line."""


class _Reader:
    """Typed reads from a mapping node, with messages `<file>:<line>: <path>: <what>`."""

    def __init__(self, source: str, node: _Node, path: str) -> None:
        self.source = source
        self.node = node
        self.path = path

    def fail(self, line: int, path: str, what: str) -> _Invalid:
        return _Invalid(f"{self.source}:{line}: {path}: {what}")

    def mapping(self) -> dict[str, _Node]:
        if not isinstance(self.node.value, dict):
            raise self.fail(self.node.line, self.path, "must be a mapping")
        return self.node.value

    def check_keys(self, known: tuple[str, ...]) -> None:
        for key, value in self.mapping().items():
            if key not in known:
                near = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else \
                    f" (expected one of: {', '.join(known)})"
                raise self.fail(value.line, f"{self.path}.{key}", f"unknown key{hint}")

    def sub(self, key: str) -> _Reader | None:
        node = self.mapping().get(key)
        if node is None or node.value is None:
            return None
        return _Reader(self.source, node, f"{self.path}.{key}")

    def line_of(self, key: str) -> int:
        node = self.mapping().get(key)
        return node.line if node is not None else self.node.line

    def str(self, key: str, *, required: bool = False, default: str | None = None,
            pattern: re.Pattern[str] | None = None, what: str = "") -> str | None:
        node = self.mapping().get(key)
        if node is None or node.value is None:
            if required:
                raise self.fail(self.node.line, f"{self.path}.{key}", "is required")
            return default
        if not isinstance(node.value, str) or not node.value.strip():
            raise self.fail(node.line, f"{self.path}.{key}", "must be a non-empty string")
        if pattern is not None and not pattern.match(node.value):
            raise self.fail(node.line, f"{self.path}.{key}", f"{node.value!r} is not {what}")
        return node.value

    def bool(self, key: str, default: bool) -> bool:
        node = self.mapping().get(key)
        if node is None or node.value is None:
            return default
        if not isinstance(node.value, bool):
            raise self.fail(node.line, f"{self.path}.{key}", "must be true or false")
        return node.value

    def number(self, key: str, default: float) -> float:
        node = self.mapping().get(key)
        if node is None or node.value is None:
            return default
        if isinstance(node.value, bool) or not isinstance(node.value, int | float) \
                or node.value < 0:
            raise self.fail(node.line, f"{self.path}.{key}", "must be a number >= 0")
        return float(node.value)

    def duration(self, key: str) -> timedelta | None:
        node = self.mapping().get(key)
        if node is None or node.value is None:
            return None
        try:
            return parse_duration(str(node.value))
        except KlosetError as exc:
            raise self.fail(node.line, f"{self.path}.{key}", str(exc)) from None

    def seconds(self, key: str, default: float) -> float:
        """A number of seconds, or a duration such as "2h"."""
        node = self.mapping().get(key)
        if node is not None and isinstance(node.value, str):
            found = self.duration(key)
            return found.total_seconds() if found is not None else default
        return self.number(key, default)

    def str_list(self, key: str) -> list[str] | None:
        node = self.mapping().get(key)
        if node is None or node.value is None:
            return None
        if not isinstance(node.value, list) or not all(
                isinstance(n.value, str) and n.value for n in node.value):
            raise self.fail(node.line, f"{self.path}.{key}", "must be a list of names")
        return [n.value for n in node.value]


def _plain(node: _Node) -> Any:
    if isinstance(node.value, dict):
        return {k: _plain(v) for k, v in node.value.items()}
    if isinstance(node.value, list):
        return [_plain(v) for v in node.value]
    return node.value


# ---------------------------------------------------------------- loading


def find_config_path(cwd: str | os.PathLike[str] | None = None) -> Path | None:
    """PGKLOSET_CONFIG if set (it must exist), else ./pgkloset.yaml if present, else None."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise ConfigError(f"{CONFIG_ENV} names {path}, which is not a readable file")
        return path
    local = Path(cwd or os.getcwd()) / CONFIG_NAME
    return local if local.is_file() else None


def load_config(path: str | os.PathLike[str]) -> PgKlosetConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror or exc}") from None
    return parse_config(text, source=str(p))


def parse_config(text: str, source: str = CONFIG_NAME) -> PgKlosetConfig:
    """Parse and validate; raises ConfigError only when nothing at all can be used."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        ctx = exc.context_mark
        began = f" ({exc.context} on line {ctx.line + 1})" if ctx is not None and exc.context \
            and (mark is None or ctx.line != mark.line) else ""
        raise ConfigError(f"{where}: not valid YAML: {exc.problem}{began}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    try:
        tree = _convert(root) if root is not None else _Node({}, 1)
    except ConfigError as exc:
        raise ConfigError(f"{source}:{str(exc).removeprefix('line ')}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: an alias refers to itself "
                          "(or the nesting is too deep)") from None
    return build_config(tree, source)


def config_from_mapping(data: Mapping[str, Any], source: str = "<mapping>") -> PgKlosetConfig:
    """The same validation for a config built in code (the demo, the Component)."""
    return parse_config(yaml.safe_dump(dict(data), sort_keys=False), source=source)


def build_config(tree: _Node, source: str) -> PgKlosetConfig:
    cfg = PgKlosetConfig(source=source)
    top = _Reader(source, tree, "")
    if not isinstance(tree.value, dict):
        raise ConfigError(f"{source}:{tree.line}: the file must be a mapping with "
                          "'klosets' and 'servers'")
    for key, node in tree.value.items():
        if key not in TOP_KEYS:
            near = difflib.get_close_matches(key, TOP_KEYS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            cfg.problems.append(Problem(f"{source}:{node.line}: {key}: unknown key{hint}; "
                                        "ignored"))
    for section in TOP_KEYS:
        node = tree.value.get(section)
        if node is None or node.value is None:
            cfg.problems.append(Problem(f"{source}:{tree.line}: {section}: is missing",
                                        severity="warning"))
        elif not isinstance(node.value, dict):
            cfg.problems.append(Problem(f"{source}:{node.line}: {section}: must be a mapping "
                                        "of names to settings"))
    klosets = top.sub("klosets")
    if klosets is not None and isinstance(klosets.node.value, dict):
        for name, node in klosets.mapping().items():
            reader = _Reader(source, node, f"klosets.{name}")
            try:
                cfg.klosets[name] = _kloset(name, reader)
            except _Invalid as exc:
                cfg.problems.append(Problem(f"{exc}; kloset {name!r} skipped",
                                            subject=f"kloset {name}"))
    servers = top.sub("servers")
    if servers is not None and isinstance(servers.node.value, dict):
        for name, node in servers.mapping().items():
            reader = _Reader(source, node, f"servers.{name}")
            try:
                cfg.servers[name] = _server(name, reader, cfg)
            except _Invalid as exc:
                cfg.problems.append(Problem(f"{exc}; server {name!r} skipped",
                                            subject=f"server {name}"))
    _env_warnings(cfg)
    return cfg


def _check_name(reader: _Reader, name: str, what: str) -> None:
    if not NAME_RE.match(name):
        raise reader.fail(reader.node.line, reader.path,
                          f"{what} name {name!r} must start with a letter and hold only "
                          "letters, digits and underscores")


def _kloset(name: str, r: _Reader) -> KlosetConfig:
    _check_name(r, name, "kloset")
    r.check_keys(KLOSET_KEYS)
    url = r.str("url", required=True)
    env = r.str("passphrase_env", required=True, pattern=ENV_RE,
                what="an environment variable name")
    grace, ratio = 3600.0, 0.25
    prune = r.sub("prune")
    if prune is not None:
        prune.check_keys(PRUNE_KEYS)
        grace = prune.seconds("grace", grace)
        ratio = prune.number("max_repack_ratio", ratio)
        if ratio > 1:
            raise prune.fail(prune.line_of("max_repack_ratio"), f"{prune.path}.max_repack_ratio",
                             "must be between 0 and 1")
    assert url is not None and env is not None
    return KlosetConfig(name=name, url=url, passphrase_env=env,
                        lock_wait=r.number("lock_wait", 60.0),
                        create_if_missing=r.bool("create_if_missing", False),
                        prune_grace=grace, max_repack_ratio=ratio)


def _cron(r: _Reader, key: str) -> str | None:
    from dagster._utils.schedules import is_valid_cron_string

    value = r.str(key)
    if value is not None and not is_valid_cron_string(value):
        raise r.fail(r.line_of(key), f"{r.path}.{key}",
                     f"{value!r} is not a valid cron expression (five fields, e.g. '0 2 * * *')")
    return value


def _server(name: str, r: _Reader, cfg: PgKlosetConfig) -> ServerConfig:
    _check_name(r, name, "server")
    r.check_keys(SERVER_KEYS)
    dsn_env = r.str("dsn_env", required=True, pattern=ENV_RE,
                    what="an environment variable name")
    kloset = r.str("kloset", required=True)
    assert dsn_env is not None and kloset is not None
    if kloset not in cfg.klosets:
        known = ", ".join(sorted(cfg.klosets)) or "none is valid"
        raise r.fail(r.line_of("kloset"), f"{r.path}.kloset",
                     f"no usable kloset named {kloset!r} (klosets: {known})")
    dbs_node = r.mapping().get("databases")
    databases: tuple[str, ...] | None
    if dbs_node is None or dbs_node.value is None:
        raise r.fail(r.node.line, f"{r.path}.databases", "is required (a list of names, or all)")
    if dbs_node.value == "all":
        databases = None
    else:
        names = r.str_list("databases")
        if not names:
            raise r.fail(dbs_node.line, f"{r.path}.databases",
                         "must be a non-empty list of database names, or all")
        databases = tuple(dict.fromkeys(names))
    exclude = tuple(r.str_list("exclude") or ())
    logical = physical = None
    tz = "UTC"
    sched = r.sub("schedule")
    if sched is not None:
        sched.check_keys(SCHEDULE_KEYS)
        logical, physical = _cron(sched, "logical"), _cron(sched, "physical")
        tz = sched.str("timezone", default="UTC") or "UTC"
    retention = None
    ret = r.sub("retention")
    if ret is not None:
        try:
            retention = RetentionPolicy.from_mapping(_plain(ret.node))
        except KlosetError as exc:
            raise r.fail(ret.node.line, ret.path, str(exc)) from None
        if retention.is_empty():
            raise r.fail(ret.node.line, ret.path, "keeps nothing: give at least one keep_* rule")
    drill_enabled, isolate, checks = True, True, []
    drill = r.sub("drill")
    if drill is not None:
        drill.check_keys(DRILL_KEYS)
        drill_enabled = drill.bool("enabled", True)
        isolate = drill.bool("isolate", True)
        sq = drill.mapping().get("sql_checks")
        if sq is not None and sq.value is not None:
            if not isinstance(sq.value, list):
                raise drill.fail(sq.line, f"{drill.path}.sql_checks", "must be a list")
            for i, item in enumerate(sq.value):
                c = _Reader(r.source, item, f"{drill.path}.sql_checks[{i}]")
                c.check_keys(SQL_CHECK_KEYS)
                cname, sql = c.str("name", required=True), c.str("sql", required=True)
                assert cname is not None and sql is not None
                checks.append(SqlCheckConfig(cname, sql, c.str("database")))
    fail = warn = None
    fresh = r.sub("freshness")
    if fresh is not None:
        fresh.check_keys(FRESHNESS_KEYS)
        fail, warn = fresh.duration("fail"), fresh.duration("warn")
        if fail is None:
            raise fresh.fail(fresh.node.line, f"{fresh.path}.fail", "is required")
        if warn is not None and warn >= fail:
            raise fresh.fail(fresh.line_of("warn"), f"{fresh.path}.warn",
                             "must be shorter than fail")
    phys_enabled, fast = True, False
    phys = r.sub("physical")
    if phys is not None:
        phys.check_keys(PHYSICAL_KEYS)
        phys_enabled = phys.bool("enabled", True)
        fast = phys.bool("fast_checkpoint", False)
    return ServerConfig(
        name=name, dsn_env=dsn_env, kloset=kloset, databases=databases, exclude=exclude,
        bin_dir=r.str("bin_dir"), logical_cron=logical, physical_cron=physical, timezone=tz,
        retention=retention, drill_enabled=drill_enabled, drill_isolate=isolate,
        sql_checks=tuple(checks), freshness_fail=fail, freshness_warn=warn,
        physical=phys_enabled, fast_checkpoint=fast)


def _env_warnings(cfg: PgKlosetConfig) -> None:
    """Missing secrets do not stop loading (runs may get them), but they are said out loud."""
    used = {s.kloset for s in cfg.servers.values()}
    for k in cfg.klosets.values():
        if k.name in used and not os.environ.get(k.passphrase_env):
            cfg.problems.append(Problem(
                f"kloset {k.name!r}: environment variable {k.passphrase_env} (its passphrase) "
                "is not set; its backups, drills and prunes fail until it is",
                severity="warning", subject=f"kloset {k.name}"))
    for s in cfg.servers.values():
        if not os.environ.get(s.dsn_env):
            cfg.problems.append(Problem(
                f"server {s.name!r}: environment variable {s.dsn_env} (its DSN) is not set; "
                "its backups fail until it is", severity="warning", subject=f"server {s.name}"))
