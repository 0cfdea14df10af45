"""Configuration: flags, TOML file, validation, and docs that cannot drift."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import get_args, get_type_hints

import pytest

from policyd import config as cfg
from policyd.cli import build_parser
from policyd.listeners import open_listeners

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "etc" / "smtpdcheck-policyd.toml"


def parse(argv: list[str], tmp_path: Path | None = None, toml: str | None = None) -> cfg.Config:
    path = None
    if toml is not None:
        assert tmp_path is not None
        path = tmp_path / "policyd.toml"
        path.write_text(toml)
    args = build_parser().parse_args(argv + (["--config", str(path)] if path else []))
    return cfg.build(args, args.config)


def test_defaults_work_out_of_the_box() -> None:
    config = parse([])
    assert config == cfg.Config()
    assert config.listen == ("inet:127.0.0.1:10040",)
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
        ('timeout = "soon"\n', "timeout: not a number"),
        ("timeout = -1\n", "timeout: must be 0 or more"),
        ("timeout = 0\n", "timeout: must be more than 0"),
        ("smtp_port = 70000\n", "smtp_port: not a TCP port"),
        ('listen = "inet:127.0.0.1:10040"\n', "listen: must be a list"),
        ('listen = ["tcp:1.2.3.4:5"]\n', "listen: bad listen address"),
        ('listen = ["unix:relative.sock"]\n', "must be absolute"),
        ('listen = ["inet:mx.example.com:10040"]\n', "want inet:IP:PORT"),
        ("listen = []\n", "at least one endpoint"),
        ('mode = "loud"\n', "mode: must be one of enforce, warn"),
        ('defer_text = "primary {host} is up"\n', "unknown placeholder {host}"),
        ('defer_text = "bad \\u00e9"\n', "printable ASCII"),
        ('nameserver = ["dns.example"]\n', "nameserver must be an IP address"),
        ('stop = ["bad name"]\n', "stop: not a host name"),
        ("cache_size = 0\n", "cache_size: must be 1 or more"),
        ("max_probes = true\n", "max_probes: must be a whole number"),
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
        cfg.build(args, args.config)


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
        ("socket_mode = 432\n", 0o660),  # a TOML integer is the bits, however it is spelled
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
        ("socket_mode = 660\n", "socket_mode: not a file mode: 660 (write 0o660 or \"0660\")"),
        ("socket_mode = -1\n", "socket_mode: not a file mode"),
        ("socket_mode = 6.6\n", "socket_mode: must be a TOML integer such as 0o660 or a string such as \"0660\""),
        ("socket_mode = true\n", "socket_mode: must be a TOML integer"),
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
        "refresh_window", "dns_stale_max",
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
