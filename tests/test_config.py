"""Configuration: flags, TOML file, validation, and docs that cannot drift."""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import argparse
from dataclasses import replace
from pathlib import Path
from typing import get_args, get_type_hints

import pytest

from policyd import config as cfg
from policyd.cli import build_parser
from policyd.listeners import ListenError, open_listeners
from smtpdcheck.probe import PROBE_REFRESH_FLOOR_S

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "etc" / "smtpdcheck-policyd.toml"


def parse(argv: list[str], tmp_path: Path | None = None, toml: str | None = None) -> cfg.Config:
    path = None
    if toml is not None:
        assert tmp_path is not None
        path = tmp_path / "policyd.toml"
        path.write_text(toml)
    args = build_parser().parse_args(argv + (["--config", str(path)] if path else []))
    return cfg.build(args, Path(args.config) if args.config else None)


def test_cache_up_ttl_is_0_or_at_least_the_probe_refresh_floor() -> None:
    """An "up" must live long enough for the probe that confirms it, which
    comes at most once per PROBE_REFRESH_FLOOR_S; 0 keeps meaning "not cached"."""
    option = next(o for o in cfg.OPTIONS if o.name == "cache_up_ttl")
    assert isinstance(option.convert, cfg.Number)
    assert option.convert.range == cfg.values.Range(PROBE_REFRESH_FLOOR_S, or_zero=True)
    assert option.allowed == f"0, or {PROBE_REFRESH_FLOOR_S:g} or more"
    assert parse(["--cache-up-ttl", "0"]).cache_up_ttl == 0
    assert parse(["--cache-up-ttl", str(PROBE_REFRESH_FLOOR_S)]).cache_up_ttl == PROBE_REFRESH_FLOOR_S
    for below in (PROBE_REFRESH_FLOOR_S / 2, PROBE_REFRESH_FLOOR_S - 0.001):
        with pytest.raises(cfg.ConfigError, match=r"^--cache-up-ttl: must be 0, or "):
            parse(["--cache-up-ttl", str(below)])


def test_defaults_work_out_of_the_box() -> None:
    config = parse([])
    assert config == cfg.Config()
    assert config.listen == (f"inet:127.0.0.1:{cfg.DEFAULT_PORT}",)
    assert config.failure_action == "DUNNO"
    # Answer well inside Postfix's policy timeout (10s in our snippets).
    assert config.deadline < 10


def test_file_then_flags_override(tmp_path: Path) -> None:
    toml = 'listen = ["inet:127.0.0.1:10050", "unix:/run/p.sock"]\nstop = ["192.0.2.25"]\ntimeout = 3\nmode = "warn"\n'
    config = parse(["--timeout", "4.5", "--stop", "198.51.100.7"], tmp_path, toml)
    assert config.listen == ("inet:127.0.0.1:10050", "unix:/run/p.sock")
    assert config.stop == ("198.51.100.7",)  # a repeatable flag replaces the file's list
    assert config.timeout == 4.5
    assert config.mode == "warn"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("tiemout = 3\n", "unknown key 'tiemout'"),
        ("smtp-port = 25\n", "use _ not -"),
        ('timeout = "soon"\n', "timeout: must be a number, not a string: 'soon'"),
        ("timeout = -1\n", "timeout: must be more than 0: -1"),
        ("timeout = 0\n", "timeout: must be more than 0: 0"),
        ("timeout = inf\n", "timeout: not a finite number: inf"),
        ("timeout = nan\n", "timeout: not a number: nan"),
        ("cache_up_ttl = -1\n", "cache_up_ttl: must be 0, or 1 or more: -1"),
        ("smtp_port = 70000\n", "smtp_port: not a TCP port"),
        ('listen = "inet:127.0.0.1:10041"\n', "listen: must be a list"),
        ('listen = ["tcp:1.2.3.4:5"]\n', "listen: bad listen address"),
        ('listen = ["unix:relative.sock"]\n', "must be absolute"),
        ('listen = ["inet:mx.example.com:10041"]\n', "want inet:IP:PORT"),
        ("listen = []\n", "at least one endpoint"),
        ('mode = "loud"\n', "mode: must be one of enforce, warn"),
        ('defer_text = "primary {host} is up"\n', "unknown placeholder {host}"),
        ('defer_text = "bad \\u00e9"\n', "printable ASCII"),
        ('nameserver = ["dns.example"]\n', "nameserver must be an IP address"),
        ('stop = ["bad name"]\n', "stop: not a host name"),
        ("cache_size = 0\n", "cache_size: must be 1 or more"),
        ("max_probes = true\n", "max_probes: must be an integer, not a boolean: True"),
        ("max_probes = 0\n", "max_probes: must be 1 or more: 0"),
        ("max_probes = 2.5\n", "max_probes: must be an integer, not a float: 2.5"),
        ('socket_mode = "999"\n', "socket_mode: not an octal"),
        ("timeout = [1]\n", "must be a single value"),
        ("this is not toml\n", "not valid TOML"),
    ],
)
def test_bad_file_is_refused_naming_key_and_file(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        parse([], tmp_path, toml)
    assert message in str(info.value)
    assert "policyd.toml" in str(info.value)


def test_bad_flag_is_refused() -> None:
    with pytest.raises(cfg.ConfigError, match="--timeout"):
        parse(["--timeout", "x"])


def test_missing_file(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--config", str(tmp_path / "none.toml")])
    with pytest.raises(cfg.ConfigError, match="cannot read"):
        cfg.build(args, Path(args.config))


def test_example_file_is_the_generated_one() -> None:
    assert EXAMPLE.read_text() == cfg.example_toml(), (
        f"{EXAMPLE.name} is stale: python -m policyd.config --example-toml > etc/{EXAMPLE.name}"
    )


def test_example_is_regenerated_by_the_documented_command() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "policyd.config", "--example-toml"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert run.stdout == cfg.example_toml()


def test_example_file_loads_and_documents_every_key(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    assert cfg.load_file(EXAMPLE) == cfg.Config()  # everything commented: the defaults
    # Uncommenting every setting must give exactly the built-in defaults.
    uncommented = re.sub(r"(?m)^#([a-z_]+ = )", r"\1", text)
    path = tmp_path / "all.toml"
    path.write_text(uncommented)
    assert cfg.load_file(path) == cfg.Config()
    for option in cfg.OPTIONS:
        block = re.search(rf"(?ms)^((?:# [^\n]*\n)+)#{option.name} = ", text)
        assert block, f"{option.name} missing from {EXAMPLE.name}"
        comment = " ".join(line[2:] for line in block.group(1).splitlines())
        assert option.help in comment
        assert ("Needs a restart" in comment) == option.restart, option.name


def test_readme_reference_matches_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    assert cfg.reference_markdown() in readme, "README's configuration table is stale: regenerate it"


def test_help_mentions_every_flag() -> None:
    text = build_parser().format_help()
    for option in cfg.OPTIONS:
        assert option.flag in text


# -- socket_mode: the bits written, whichever way they are written ----------


@pytest.mark.parametrize(
    ("toml", "bits"),
    [
        ("socket_mode = 0o660\n", 0o660),
        ("socket_mode = 0o640\n", 0o640),
        ("socket_mode = 0o666\n", 0o666),
        ("socket_mode = 0o600\n", 0o600),
        ('socket_mode = "0660"\n', 0o660),
        ('socket_mode = "660"\n', 0o660),
        ('socket_mode = "0640"\n', 0o640),
    ],
)
def test_socket_mode_from_file_is_the_mode_written(tmp_path: Path, toml: str, bits: int) -> None:
    assert parse([], tmp_path, toml).socket_mode == bits


def test_socket_mode_flag_is_octal_text() -> None:
    assert parse(["--socket-mode", "0660"]).socket_mode == 0o660
    assert parse(["--socket-mode", "640"]).socket_mode == 0o640


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("socket_mode = 660\n", "socket_mode: 660 is a decimal number in TOML, not a file mode; write 0o660 or \"0660\""),
        ("socket_mode = -1\n", "socket_mode: -1 is a decimal number in TOML, not a file mode"),
        ("socket_mode = 6.6\n", "socket_mode: must be an integer or a string, not a float: 6.6"),
        ("socket_mode = true\n", "socket_mode: must be an integer or a string, not a boolean: True"),
        ("socket_mode = 0o1777\n", "socket_mode: not a file mode: 1023"),
        ('socket_mode = "0o999"\n', "socket_mode: not an octal file mode"),
        ('socket_mode = "rw-rw----"\n', "socket_mode: not an octal file mode"),
        ('socket_mode = "01777"\n', "socket_mode: not a file mode"),
        ('socket_mode = ""\n', "socket_mode: not an octal file mode"),
    ],
)
def test_socket_mode_that_is_not_a_mode_is_refused(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        parse([], tmp_path, toml)
    assert message in str(info.value)


async def test_unix_socket_from_file_has_the_configured_mode_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "p.sock"
    config = parse([], tmp_path, f'listen = ["unix:{path}"]\nsocket_mode = 0o660\n')
    listeners = await open_listeners(config.listen, socket_mode=config.socket_mode)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    finally:
        for listener in listeners:
            await listener.aclose()


# -- reload: restart-only options keep their running values ----------------


def test_restart_only_options_are_those_whose_parts_live_as_long_as_the_process() -> None:
    assert set(cfg.RESTART_ONLY) == {
        "listen", "socket_mode", "nameserver", "dns_timeout", "dns_max_ttl", "dns_negative_ttl",
        "dns_failure_ttl", "cache_size", "max_probes", "max_dns_queries", "max_connections", "metrics",
        "refresh_window", "dns_stale_max", "socket_group", "allow_clients",
    }
    assert cfg.RESTART_ONLY == tuple(o.name for o in cfg.OPTIONS if o.restart)


def test_reloaded_keeps_running_values_of_restart_only_options() -> None:
    running = cfg.Config(listen=("inet:127.0.0.1:10041",), dns_timeout=2.0)
    loaded = cfg.Config(listen=("inet:127.0.0.1:10042",), dns_timeout=7.0, timeout=3.0, mode="warn", cache_size=5)
    config, waiting = running.reloaded(loaded)
    assert waiting == ("listen", "dns_timeout", "cache_size")  # in table order
    assert config == cfg.Config(listen=("inet:127.0.0.1:10041",), dns_timeout=2.0, timeout=3.0, mode="warn")


def test_reloaded_with_nothing_restart_only_changed_is_the_new_config() -> None:
    running = cfg.Config(dns_timeout=3.0)
    loaded = cfg.Config(dns_timeout=3.0, deadline=6.0, stop=("192.0.2.25",), log_level="debug")
    assert running.reloaded(loaded) == (loaded, ())
    # A file put back as it was leaves nothing waiting.
    assert running.reloaded(running) == (running, ())


# -- choices: written once, as Literal types --------------------------------


@pytest.mark.parametrize("name", ["mode", "failure_action", "log_level", "log_target"])
def test_choice_options_accept_exactly_their_literal_words(name: str) -> None:
    allowed = get_args(get_type_hints(cfg.Config)[name])
    assert allowed and getattr(cfg.Config(), name) in allowed
    convert = next(o.convert for o in cfg.OPTIONS if o.name == name)
    for word in allowed:
        assert convert(word) == word
        assert convert(word.swapcase()) == word  # case does not matter
    with pytest.raises(cfg.ConfigError, match="must be one of " + ", ".join(allowed)):
        convert("nonsense")


# -- types in the file: the converters also read flags, which are text -------


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('timeout = "3"\n', "timeout: must be a number, not a string: '3'"),
        ('smtp_port = "25"\n', "smtp_port: must be an integer, not a string: '25'"),
        ("defer_text = 5\n", "defer_text: must be a string, not an integer: 5"),
        ("stop = [1]\n", "stop: each item must be a string, not an integer: 1"),
        ('mode = true\n', "mode: must be a string, not a boolean: True"),
        ("listen = [[\"inet:127.0.0.1:1\"]]\n", "listen: each item must be a string, not an array"),
        ("metrics = 1979-05-27\n", "metrics: must be a string, not a date or time"),
        ('cache_size = "10"\n', "cache_size: must be an integer, not a string: '10'"),
    ],
)
def test_wrong_toml_type_is_refused_naming_key_and_file(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        parse([], tmp_path, toml)
    assert str(info.value) == f"{tmp_path / 'policyd.toml'}: {message}" or message in str(info.value)
    assert str(info.value).startswith(f"{tmp_path / 'policyd.toml'}: ")


def test_the_same_values_as_text_are_fine_on_the_command_line() -> None:
    config = parse(["--timeout", "3", "--smtp-port", "2525", "--defer-text", "5", "--stop", "192.0.2.1"])
    assert (config.timeout, config.smtp_port, config.defer_text, config.stop) == (3.0, 2525, "5", ("192.0.2.1",))


# -- socket_mode = 440 is decimal in TOML: refused, not mode 0670 ------------


@pytest.mark.parametrize(
    ("line", "suggestion"),
    [
        ("socket_mode = 440", 'write 0o440 or "0440"'),
        ("socket_mode=440 # the group may read", 'write 0o440 or "0440"'),
        ('"socket_mode" = 600', 'write 0o600 or "0600"'),
        ("socket_mode = 438", 'such as 0o660 or "0660"'),  # 0o666 in decimal: refused too
        ("socket_mode = 0x1b6", 'such as 0o660 or "0660"'),
        ("socket_mode = 0b110110110", 'such as 0o660 or "0660"'),
    ],
)
def test_socket_mode_integer_not_written_in_octal_is_refused(tmp_path: Path, line: str, suggestion: str) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        parse([], tmp_path, line + "\n")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'policyd.toml'}: socket_mode: ")
    assert "decimal" in message or "octal" in message
    assert suggestion in message


def test_socket_mode_in_octal_beside_a_table_is_read() -> None:
    assert cfg._check_mode_spelling("socket_mode = 0o440\n", {"socket_mode": 0o440}, "f") is None


# -- ranges: stated once in the table, every message and document from there --

_NUMBERS = [o for o in cfg.OPTIONS if isinstance(o.convert, cfg.Number)]


@pytest.mark.parametrize("option", _NUMBERS, ids=lambda o: o.name)
@pytest.mark.parametrize("text", ["-1", "0", "0.5", "inf", "nan", "1e9999", "70000"])
def test_every_number_is_refused_in_words_its_range_gives(option: cfg.Option, text: str) -> None:
    number = float(text)
    try:
        config = parse([option.flag, text])
    except cfg.ConflictingOptions as exc:
        # In range, but not with the other defaults: the message names it among the options involved.
        assert number in option.convert.range  # type: ignore[attr-defined]
        assert f"{option.flag} " in str(exc)
    except cfg.ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{option.flag}: ")
        assert isinstance(option.convert, cfg.Number)
        integer = option.convert.parse is not cfg.values.seconds
        if integer and not (number.is_integer() and "e" not in text):
            assert message.endswith((f"not a whole number: {text!r}", f"not a TCP port: {text!r}")), message
        elif number != number:
            assert message.endswith(f"not a number: {text!r}")
        elif number in (float("inf"), float("-inf")):
            assert message.endswith(f"not a finite number: {text!r}")
        elif option.convert.range == cfg.values.PORTS:
            assert message.endswith((f"not a TCP port ({option.allowed}): {text!r}", f"not a TCP port: {text!r}"))
        else:
            assert number not in option.convert.range
            assert message.endswith(f"must be {option.allowed}: {text!r}"), message
    else:
        assert number in option.convert.range  # type: ignore[attr-defined]
        assert getattr(config, option.name) == number


@pytest.mark.parametrize("option", [o for o in cfg.OPTIONS if o.allowed], ids=lambda o: o.name)
def test_help_and_documents_state_the_range_or_choices_and_the_default_once(option: cfg.Option) -> None:
    assert option.allowed is not None
    help_text = " ".join(build_parser().format_help().split())
    assert f"({option.allowed}; default: {' '.join(cfg.default_text(option).split())})" in help_text
    assert f"# Allowed: {option.allowed}." in EXAMPLE.read_text()
    assert f"| {option.allowed} |" in cfg.reference_markdown()


def test_help_gives_each_default_once() -> None:
    text = " ".join(build_parser().format_help().split())
    assert text.count("default:") == len(cfg.OPTIONS) + 1  # and --config's
    for option in cfg.OPTIONS:
        assert "default" not in option.help, option.name


# -- unix socket paths that cannot be listened on: one line naming the path --


async def _listen_error(path: Path) -> str:
    with pytest.raises(ListenError) as info:
        await open_listeners((f"unix:{path}",), socket_mode=0o660)
    return str(info.value)


async def test_unix_socket_in_a_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "policy"
    assert await _listen_error(path) == f"unix:{path}: no such directory: {path.parent}"


async def test_unix_socket_path_too_long(tmp_path: Path) -> None:
    path = tmp_path / ("d" * 100) / "policy"
    assert await _listen_error(path) == f"unix:{path}: path too long for a unix socket (at most 107 bytes)"


@pytest.mark.parametrize("traversable", [True, False], ids=["bind-refused", "lookup-refused"])
async def test_unix_socket_in_a_directory_the_user_cannot_write(tmp_path: Path, traversable: bool) -> None:
    # Reachable by everybody up to the directory (a queue directory is), or not at all.
    directory = Path(tempfile.mkdtemp(prefix="sm", dir="/tmp" if traversable else tmp_path))
    try:
        directory.chmod(0o755)
        path = directory / "policy"
        if os.geteuid() != 0:
            directory.chmod(0o555 if traversable else 0o000)
            message = await _listen_error(path)
        else:  # root may write anywhere: listen as nobody for a moment
            os.seteuid(65534)
            try:
                message = await _listen_error(path)
            finally:
                os.seteuid(0)
        assert message == f"unix:{path}: permission denied (the daemon's user must be able to write {directory})"
    finally:
        directory.chmod(0o755)
        shutil.rmtree(directory)


async def test_unix_socket_on_a_read_only_file_system(tmp_path: Path) -> None:
    mount = tmp_path / "ro"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)], check=False).returncode:
        pytest.skip("mounting a read-only file system needs root")
    try:
        path = mount / "policy"
        assert await _listen_error(path) == f"unix:{path}: read-only file system ({mount})"
    finally:
        subprocess.run(["umount", str(mount)], check=True)


async def test_listeners_open_all_or_none_and_remove_the_socket_files_they_made(tmp_path: Path) -> None:
    """A half-started daemon is worse than none: no listener and no socket file is left."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    path = tmp_path / "policy.sock"
    with taken:
        endpoint = f"inet:127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ListenError, match=f"^{endpoint}: "):
            await open_listeners((f"unix:{path}", endpoint), socket_mode=0o660)
    assert not path.exists()


# -- who may connect: --allow-client, --socket-group ---------------------------


def test_allow_client_flag_is_singular_and_the_file_key_plural(tmp_path: Path) -> None:
    option = next(o for o in cfg.OPTIONS if o.name == "allow_clients")
    assert option.flag == "--allow-client"
    config = parse(["--allow-client", "192.0.2.0/24", "--allow-client", "2001:db8::1"])
    assert config.allow_clients == ("192.0.2.0/24", "2001:db8::1/128")
    from_file = parse([], tmp_path, 'allow_clients = ["127.0.0.2", "10.0.0.0/8"]\n')
    assert from_file.allow_clients == ("127.0.0.2/32", "10.0.0.0/8")
    assert "| `--allow-client NETWORK` | `allow_clients` |" in cfg.reference_markdown()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('allow_clients = ["192.0.2.1/24"]\n', "allow_clients: not a network or address: '192.0.2.1/24' (192.0.2.1/24 has host bits set)"),
        ('allow_clients = ["mx.example.com"]\n', "allow_clients: not a network or address: 'mx.example.com'"),
        ('allow_clients = "127.0.0.1"\n', "allow_clients: must be a list"),
        ('allow-clients = ["127.0.0.1"]\n', "use _ not -"),
        ('socket_group = "no-such-group-here"\n', "socket_group: no such group: 'no-such-group-here'"),
    ],
)
def test_bad_client_settings_are_refused_naming_the_key(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(cfg.ConfigError, match=re.escape(message)):
        parse([], tmp_path, toml)


def test_socket_group_that_exists_is_kept_and_sockets_are_not_world_writable_by_default() -> None:
    assert parse(["--socket-group", "nogroup"]).socket_group == "nogroup"
    assert cfg.Config().socket_mode == 0o660
    assert cfg.Config().socket_group == ""


# -- spawn(8): defaults of its own where one process per smtpd changes the trade --


def test_stdio_mode_does_not_refresh_ahead_unless_told_to(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser)
    assert cfg.build(parser.parse_args([]), None).refresh_window == cfg.defaults.REFRESH_WINDOW_S
    assert cfg.build(parser.parse_args([]), None, stdio=True).refresh_window == cfg.defaults.SPAWN_REFRESH_WINDOW_S == 0
    path = tmp_path / "policyd.toml"
    path.write_text("refresh_window = 300\n")
    assert cfg.build(parser.parse_args([]), path, stdio=True).refresh_window == 300
    assert cfg.build(parser.parse_args(["--refresh-window", "30"]), None, stdio=True).refresh_window == 30
    # Every other default is the daemon's.
    assert cfg.stdio_defaults() == replace(cfg.Config(), refresh_window=0.0)
    option = next(o for o in cfg.OPTIONS if o.name == "refresh_window")
    assert cfg.default_text(option) == "120 (0 with --stdio)"
