"""The ``smtpdcheck`` command, run as a real process.

Exit status and output are the interface shell scripts rely on (Mail
Avenger's ``server=`smtpdcheck --stop $MYIP $RECIP_MXES```): 1 and the
server's name as written on stdout when one is available, 0 and nothing when
none is, 2 and one line on stderr for bad usage or a system error.  Names are
served by the fake DNS server, servers by greeters on 127.0.0.2, .3, ...
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.conftest import Farm, zone_with_hosts
from testbeds.dnsserver import Behavior, FakeDNSServer, Zone, nameserver_arg
from testbeds.greeters import Greeter, Mode

CLI = [sys.executable, "-m", "smtpdcheck.cli"]
ROOT = Path(__file__).resolve().parents[1]  # run the same code the tests import

# The man page's example hosts; s2 plays this host.
MAN_PAGE_HOSTS = {"s1.domain.com": ["127.0.0.2"], "s2.domain.com": ["127.0.0.3"], "s3.domain.com": ["127.0.0.4"]}
SAME_PRIO = ["10:s1.domain.com", "10:s2.domain.com", "20:s3.domain.com"]
WORSE_PRIO = ["10:s1.domain.com", "20:s2.domain.com", "20:s3.domain.com"]


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    elapsed: float


async def smtpdcheck(*args: str, limit: float = 15.0) -> Run:
    start = trio.current_time()
    with trio.fail_after(limit):
        proc = await trio.run_process([*CLI, *args], cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False)
    return Run(proc.returncode, proc.stdout.decode(), proc.stderr.decode(), trio.current_time() - start)


def error_line(run: Run) -> str:
    """Exit 2, nothing on stdout, exactly one line on stderr; return it."""
    assert run.code == 2, run
    assert run.stdout == ""
    assert run.stderr.endswith("\n") and run.stderr.count("\n") == 1, run.stderr
    line = run.stderr[:-1]
    assert line.startswith("smtpdcheck: ")
    return line


@pytest.fixture
def ns(dns_server: FakeDNSServer) -> list[str]:
    return ["--nameserver", nameserver_arg(dns_server)]


@pytest.fixture
async def man_page(farm: Callable[..., Farm], dns_server: FakeDNSServer) -> Farm:
    """s1, s2, s3 resolvable and all three greeting 220."""
    f = await farm(Mode.OK, Mode.OK, Mode.OK)
    dns_server.zone.update(zone_with_hosts(MAN_PAGE_HOSTS))
    return f


def port(f: Farm) -> list[str]:
    return ["--smtp-port", str(f.port)]


# ------------------------------------------------------------ basic contract


@pytest.mark.parametrize(
    ("word", "printed"),
    [
        ("MX1.Example.COM.", "MX1.Example.COM."),
        ("10:MX1.Example.COM.", "MX1.Example.COM."),
        ("127.0.0.2", "127.0.0.2"),
        ("5:127.0.0.2", "127.0.0.2"),
        ("[127.0.0.2]", "[127.0.0.2]"),
        ("0:[127.0.0.2]", "[127.0.0.2]"),
    ],
)
async def test_available_server_is_printed_as_written(
    farm: Callable[..., Farm], dns_server: FakeDNSServer, ns: list[str], word: str, printed: str
) -> None:
    f = await farm(Mode.OK)
    dns_server.zone.update(zone_with_hosts({"mx1.example.com": ["127.0.0.2"]}))
    run = await smtpdcheck(*ns, *port(f), word)
    assert (run.code, run.stdout, run.stderr) == (1, printed + "\n", "")


async def test_the_available_one_among_unavailable_ones(farm: Callable[..., Farm], ns: list[str]) -> None:
    f = await farm(Mode.CODE_421, Mode.CLOSE, Mode.OK)
    # 127.0.0.9: nothing listens there (connection refused).
    run = await smtpdcheck(*ns, *port(f), "10:127.0.0.9", "10:127.0.0.2", "20:127.0.0.3", "30:127.0.0.4")
    assert (run.code, run.stdout, run.stderr) == (1, "127.0.0.4\n", "")


async def test_none_available_exits_0_silently(farm: Callable[..., Farm], ns: list[str]) -> None:
    f = await farm(Mode.CODE_421, Mode.CODE_554, Mode.SILENT, Mode.GARBAGE)
    run = await smtpdcheck(*ns, *port(f), "--timeout", "0.5", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.9")
    assert (run.code, run.stdout, run.stderr) == (0, "", "")


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        pytest.param([], "no servers", id="no-servers"),
        pytest.param(["x:mx.example"], "'x:mx.example'", id="bad-prio"),
        pytest.param(["70000:mx.example"], "'70000:mx.example'", id="prio-out-of-range"),
        pytest.param(["10:"], "'10:'", id="missing-name"),
        pytest.param(["mx example"], "'mx example'", id="space-in-name"),
        pytest.param(["[mx.example]"], "'[mx.example]'", id="bracketed-name"),
        pytest.param(["--timeout", "-1", "mx.example"], "--timeout", id="negative-timeout"),
        pytest.param(["--timeout", "soon", "mx.example"], "--timeout", id="timeout-not-a-number"),
        pytest.param(["--smtp-port", "0", "mx.example"], "--smtp-port", id="bad-port"),
        pytest.param(["--frobnicate", "mx.example"], "--frobnicate", id="unknown-option"),
        pytest.param(["--nameserver", "ns.example", "mx.example"], "ns.example", id="nameserver-not-an-ip"),
        pytest.param(["--mx", "d.example", "mx.example"], "--mx", id="mx-and-servers"),
        pytest.param(["--stop", "bad name", "mx.example"], "bad name", id="stop-not-a-name"),
    ],
)
async def test_bad_usage_exits_2_with_one_line(args: list[str], mentions: str) -> None:
    run = await smtpdcheck(*args)
    assert mentions in error_line(run)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--timeout", "-1"], "smtpdcheck: argument --timeout: must be 0 or more: '-1'"),
        (["--timeout", "soon"], "smtpdcheck: argument --timeout: not a number: 'soon'"),
        (["--timeout", "nan"], "smtpdcheck: argument --timeout: not a number: 'nan'"),
        (["--timeout", "inf"], "smtpdcheck: argument --timeout: not a finite number: 'inf'"),
        (["--smtp-port", "0"], "smtpdcheck: argument --smtp-port: not a TCP port (1 to 65535): '0'"),
        (["--smtp-port", "65536"], "smtpdcheck: argument --smtp-port: not a TCP port (1 to 65535): '65536'"),
        (["--smtp-port", "\u00b2"], "smtpdcheck: argument --smtp-port: not a TCP port: '\u00b2'"),
        (["--nameserver", "127.0.0.1:0"], "smtpdcheck: bad port in '127.0.0.1:0': not a TCP port (1 to 65535): '0'"),
        (["--nameserver", "[::1]:dns"], "smtpdcheck: bad port in '[::1]:dns': not a TCP port: 'dns'"),
    ],
)
async def test_bad_seconds_and_ports_say_which_and_why(args: list[str], line: str) -> None:
    """The same validators as the policy server's, with the flag named."""
    run = await smtpdcheck(*args, "mx.example")
    assert error_line(run) == line


async def test_help() -> None:
    run = await smtpdcheck("--help")
    assert run.code == 0 and run.stderr == ""
    for text in ("--stop", "--timeout", "exit status", "[prio:]server"):
        assert text in run.stdout


# ------------------------------------------------------------ the stop rule


@pytest.mark.parametrize("mode", ["concurrent", "sequential"])
async def test_man_page_first_example_always_exits_0(man_page: Farm, ns: list[str], mode: str) -> None:
    """smtpdcheck --stop s2.domain.com 10:s1 10:s2 20:s3: s1 is up, but has
    this host's priority, so the answer is still 'none'."""
    extra = ["--sequential"] if mode == "sequential" else []
    run = await smtpdcheck(*ns, *port(man_page), *extra, "--stop", "s2.domain.com", *SAME_PRIO)
    assert (run.code, run.stdout, run.stderr) == (0, "", "")
    assert [g.connections for g in man_page.greeters] == [0, 0, 0]  # nobody was contacted


@pytest.mark.parametrize(
    ("s1_mode", "code", "stdout"),
    [
        pytest.param(Mode.OK, 1, "s1.domain.com\n", id="s1-up"),
        pytest.param(Mode.CODE_421, 0, "", id="s1-421"),
        pytest.param(Mode.SILENT, 0, "", id="s1-silent"),
    ],
)
async def test_man_page_second_example(man_page: Farm, ns: list[str], s1_mode: Mode, code: int, stdout: str) -> None:
    """smtpdcheck --stop s2.domain.com 10:s1 20:s2 20:s3: prints s1 while it is up."""
    man_page.greeters[0].mode = s1_mode
    run = await smtpdcheck(*ns, *port(man_page), "--timeout", "0.5", "--stop", "s2.domain.com", *WORSE_PRIO)
    assert (run.code, run.stdout, run.stderr) == (code, stdout, "")
    assert man_page.greeters[0].connections == 1
    assert [g.connections for g in man_page.greeters[1:]] == [0, 0]  # this host and its peer: never


async def test_stop_by_address_the_mail_avenger_idiom(man_page: Farm, ns: list[str]) -> None:
    """``--stop $MYIP $RECIP_MXES``: this host known by its address only."""
    run = await smtpdcheck(*ns, *port(man_page), "--stop", "127.0.0.3", *WORSE_PRIO)
    assert (run.code, run.stdout, run.stderr) == (1, "s1.domain.com\n", "")
    run = await smtpdcheck(*ns, *port(man_page), "--stop", "127.0.0.3", *SAME_PRIO)
    assert (run.code, run.stdout, run.stderr) == (0, "", "")
    assert [g.connections for g in man_page.greeters] == [1, 0, 0]


async def test_stop_given_twice_name_and_address(man_page: Farm, ns: list[str]) -> None:
    """This host is s2 by name and also owns s3's address: both count."""
    man_page.greeters[0].mode = Mode.CODE_421  # s1 down, s3 up
    servers = ["10:s1.domain.com", "20:s3.domain.com", "30:s2.domain.com"]
    run = await smtpdcheck(*ns, *port(man_page), "--stop", "s2.domain.com", *servers)
    assert (run.code, run.stdout, run.stderr) == (1, "s3.domain.com\n", "")
    connections = man_page.greeters[2].connections
    run = await smtpdcheck(*ns, *port(man_page), "--stop", "s2.domain.com", "--stop", "127.0.0.4", *servers)
    assert (run.code, run.stdout, run.stderr) == (0, "", "")
    assert man_page.greeters[2].connections == connections  # s3 not contacted the second time
    assert man_page.greeters[1].connections == 0


@pytest.mark.parametrize(
    ("zone", "args", "mentions"),
    [
        pytest.param({}, [], "NXDOMAIN", id="nxdomain"),
        pytest.param({("nx.domain.com", "*"): Behavior.SERVFAIL}, [], "SERVFAIL", id="servfail"),
        pytest.param({("nx.domain.com", "A"): [], ("nx.domain.com", "AAAA"): []}, [], "no address records", id="nodata"),
        pytest.param({("nx.domain.com", "*"): Behavior.HANG}, ["--timeout", "1"], "timeout", id="hang"),
    ],
)
async def test_stop_name_that_does_not_resolve_exits_2(
    man_page: Farm, dns_server: FakeDNSServer, ns: list[str], zone: Zone, args: list[str], mentions: str
) -> None:
    dns_server.zone.update(zone)
    run = await smtpdcheck(*ns, *port(man_page), *args, "--stop", "nx.domain.com", *WORSE_PRIO)
    line = error_line(run)
    assert "nx.domain.com" in line and mentions in line
    assert run.elapsed < 5
    assert [g.connections for g in man_page.greeters] == [0, 0, 0]


@pytest.mark.parametrize(
    "zone",
    [
        pytest.param({}, id="nxdomain"),
        pytest.param({("gone.domain.com", "*"): Behavior.SERVFAIL}, id="servfail"),
    ],
)
async def test_server_name_that_does_not_resolve_is_just_unavailable(
    man_page: Farm, dns_server: FakeDNSServer, ns: list[str], zone: Zone
) -> None:
    dns_server.zone.update(zone)
    alone = await smtpdcheck(*ns, *port(man_page), "10:gone.domain.com")
    assert (alone.code, alone.stdout, alone.stderr) == (0, "", "")
    with_live = await smtpdcheck(*ns, *port(man_page), "10:gone.domain.com", "20:s1.domain.com")
    assert (with_live.code, with_live.stdout, with_live.stderr) == (1, "s1.domain.com\n", "")


# ------------------------------------------------------------------ timing


async def test_silent_server_costs_the_timeout_only(farm: Callable[..., Farm], ns: list[str]) -> None:
    f = await farm(Mode.SILENT)
    run = await smtpdcheck(*ns, *port(f), "--timeout", "0.5", "127.0.0.2")
    assert (run.code, run.stdout, run.stderr) == (0, "", "")
    assert run.elapsed < 2.0


async def test_timeout_0_means_no_limit(farm: Callable[..., Farm], ns: list[str]) -> None:
    f = await farm(Mode.PAUSED_MULTILINE, pause=0.2)
    run = await smtpdcheck(*ns, *port(f), "--timeout", "0", "127.0.0.2")
    assert (run.code, run.stdout, run.stderr) == (1, "127.0.0.2\n", "")


SILENT_SILENT_LIVE = ["10:127.0.0.2", "20:127.0.0.3", "30:127.0.0.4"]


async def test_sequential_waits_for_each_silent_server(farm: Callable[..., Farm], ns: list[str]) -> None:
    f = await farm(Mode.SILENT, Mode.SILENT, Mode.OK)
    run = await smtpdcheck(*ns, *port(f), "--sequential", "--timeout", "1", *SILENT_SILENT_LIVE)
    assert (run.code, run.stdout, run.stderr) == (1, "127.0.0.4\n", "")
    assert run.elapsed >= 2 * 1.0


async def test_concurrent_answers_before_one_timeout(farm: Callable[..., Farm], ns: list[str]) -> None:
    """Same list as the sequential test: the live server's name is on stdout
    well before a single timeout has passed, and the process ends within it."""
    f = await farm(Mode.SILENT, Mode.SILENT, Mode.OK)
    timeout = 1.5
    start = trio.current_time()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(
                partial(
                    trio.run_process,
                    [*CLI, *ns, *port(f), "--timeout", str(timeout), *SILENT_SILENT_LIVE],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    capture_stderr=True,
                    check=False,
                )
            )
            output = b""
            first_line_at = None
            async with proc.stdout:
                async for chunk in proc.stdout:
                    output += chunk
                    if first_line_at is None and b"\n" in output:
                        first_line_at = trio.current_time() - start
    ended_at = trio.current_time() - start
    assert proc.returncode == 1 and output == b"127.0.0.4\n"
    assert first_line_at is not None and first_line_at < timeout
    assert ended_at < timeout + 1.0


# --------------------------------------------------------------- reporting


async def test_verbose_reports_each_server_on_stderr(farm: Callable[..., Farm], ns: list[str]) -> None:
    f = await farm(Mode.CODE_421)
    run = await smtpdcheck(*ns, *port(f), "-v", "--stop", "127.0.0.5", "10:127.0.0.2", "20:127.0.0.9", "30:127.0.0.5")
    assert (run.code, run.stdout) == (0, "")
    lines = run.stderr.splitlines()
    assert len(lines) == 3, run.stderr
    p = f.port
    assert re.fullmatch(
        rf"smtpdcheck: 10:127\.0\.0\.2 \[127\.0\.0\.2\] 127\.0\.0\.2:{p} declined \(421 4\.3\.2 Service shutting down\) [\d.]+ ms",
        lines[0],
    ), lines[0]
    assert re.fullmatch(
        rf"smtpdcheck: 20:127\.0\.0\.9 \[127\.0\.0\.9\] 127\.0\.0\.9:{p} connect failed \(ECONNREFUSED\) [\d.]+ ms", lines[1]
    ), lines[1]
    assert lines[2] == "smtpdcheck: 30:127.0.0.5 [127.0.0.5] this host 0.0 ms"


async def test_verbose_with_a_winner_keeps_stdout_to_the_name(farm: Callable[..., Farm], dns_server: FakeDNSServer, ns: list[str]) -> None:
    f = await farm(Mode.OK)
    dns_server.zone.update(zone_with_hosts({"mx1.example.com": ["127.0.0.2"]}))
    run = await smtpdcheck(*ns, *port(f), "--verbose", "10:MX1.example.com")
    assert (run.code, run.stdout) == (1, "MX1.example.com\n")
    [line] = run.stderr.splitlines()
    assert re.fullmatch(r"smtpdcheck: 10:MX1\.example\.com \[127\.0\.0\.2\] available [\d.]+ ms", line), line


# ------------------------------------------------------------------- --mx


@pytest.fixture
async def mx_domain(farm: Callable[..., Farm], dns_server: FakeDNSServer) -> Farm:
    """d.example: MX 10 mx1 (a greeter), MX 20 backup (127.0.0.1, this host)."""
    f = await farm(Mode.OK)
    dns_server.zone.update({
        ("d.example", "MX"): ["10 mx1.d.example.", "20 backup.d.example."],
        **zone_with_hosts({"mx1.d.example": ["127.0.0.2"], "backup.d.example": ["127.0.0.1"]}),
    })
    return f


async def test_mx_explains_a_live_primary(mx_domain: Farm, ns: list[str]) -> None:
    run = await smtpdcheck(*ns, *port(mx_domain), "--stop", "127.0.0.1", "--mx", "d.example")
    assert run.code == 1 and run.stderr == ""
    lines = run.stdout.splitlines()
    assert lines[0] == "domain d.example: mx"
    assert re.fullmatch(
        rf"\s+10 mx1\.d\.example\s+\[127\.0\.0\.2\] probed: UP: 127\.0\.0\.2:{mx_domain.port} available "
        rf"\(220 mx\.test ESMTP ready\) [\d.]+ ms",
        lines[1],
    ), lines[1]
    # The run ends at the first live MX; this host's line may or may not have its lookup yet.
    assert re.fullmatch(r"\s+20 backup\.d\.example \[(127\.0\.0\.1\] this host|-\] not probed)", lines[2]), lines[2]
    assert re.fullmatch(r"checked in [\d.]+ ms", lines[3])
    assert lines[4:] == ["verdict: DEFER_IF_PERMIT (primary mx1.d.example live)"]


async def test_mx_explains_a_dead_primary(mx_domain: Farm, ns: list[str]) -> None:
    mx_domain.greeters[0].mode = Mode.CODE_421
    run = await smtpdcheck(*ns, *port(mx_domain), "--stop", "127.0.0.1", "--mx", "user@D.Example")
    assert run.code == 0 and run.stderr == ""
    lines = run.stdout.splitlines()
    assert lines[0] == "domain d.example: mx"
    assert re.fullmatch(
        rf"\s+10 mx1\.d\.example\s+\[127\.0\.0\.2\] probed: down: 127\.0\.0\.2:{mx_domain.port} declined "
        rf"\(421 4\.3\.2 Service shutting down\) [\d.]+ ms",
        lines[1],
    ), lines[1]
    assert lines[2] == "     20 backup.d.example [127.0.0.1] this host"
    assert re.fullmatch(r"checked in [\d.]+ ms", lines[3])
    assert lines[4:] == ["verdict: DUNNO (all 1 more-preferred MX down)"]


async def test_mx_of_a_domain_that_does_not_exist(mx_domain: Farm, ns: list[str]) -> None:
    run = await smtpdcheck(*ns, *port(mx_domain), "--stop", "127.0.0.1", "--mx", "nowhere.example")
    assert (run.code, run.stderr) == (0, "")
    assert run.stdout == "domain nowhere.example: nxdomain (NXDOMAIN)\nverdict: DUNNO (domain does not exist)\n"
    assert mx_domain.greeters[0].connections == 0


async def test_mx_dns_failure_exits_2(mx_domain: Farm, dns_server: FakeDNSServer, ns: list[str]) -> None:
    dns_server.zone.update({("broken.example", "*"): Behavior.SERVFAIL})
    run = await smtpdcheck(*ns, *port(mx_domain), "--stop", "127.0.0.1", "--mx", "broken.example")
    assert run.code == 2
    assert run.stdout.splitlines()[-1] == "verdict: DUNNO (dns failure: SERVFAIL)"


async def test_mx_shows_unusable_targets_escaped(mx_domain: Farm, dns_server: FakeDNSServer, ns: list[str]) -> None:
    """Hostile MX data reaches the admin's terminal only as escaped, printable text."""
    dns_server.zone[("d.example", "MX")] = ["5 cr\\013\\010lf.d.example.", "6 esc\\027[2J.d.example.", "10 mx1.d.example.", "20 backup.d.example."]
    run = await smtpdcheck(*ns, *port(mx_domain), "--stop", "127.0.0.1", "--mx", "d.example")
    assert run.code == 1 and run.stderr == ""
    lines = run.stdout.splitlines()
    assert lines[:3] == [
        "domain d.example: mx",
        "  ignored unusable MX target cr\\013\\010lf.d.example.",
        "  ignored unusable MX target esc\\027[2J.d.example.",
    ]
    assert lines[-1] == "verdict: DEFER_IF_PERMIT (primary mx1.d.example live)"
    assert all(" " <= c <= "~" for c in run.stdout.replace("\n", ""))


async def test_mx_of_an_international_domain(farm: Callable[..., Farm], dns_server: FakeDNSServer, ns: list[str]) -> None:
    f = await farm(Mode.CODE_421)
    dns_server.zone.update({
        ("xn--bcher-kva.example", "MX"): ["10 mx1.xn--bcher-kva.example."],
        **zone_with_hosts({"mx1.xn--bcher-kva.example": ["127.0.0.2"]}),
    })
    run = await smtpdcheck(*ns, *port(f), "--mx", "Bücher.example")
    assert run.code == 0 and run.stderr == ""
    lines = run.stdout.splitlines()
    assert lines[0] == "domain xn--bcher-kva.example: mx"
    assert lines[-1] == "verdict: DUNNO (all 1 MX down (this host is not an MX of the domain))"


# ------------------------------------------------------------------- IPv6


@pytest.mark.parametrize(
    ("words", "code", "stdout"),
    [
        pytest.param(["[::1]"], 1, "[::1]\n", id="bracketed"),
        pytest.param(["10:[::1]"], 1, "[::1]\n", id="prio-bracketed"),
        pytest.param(["::1"], 1, "::1\n", id="bare"),
        pytest.param(["--stop", "::1", "10:[::1]"], 0, "", id="stop-by-v6-address"),
    ],
)
async def test_ipv6_literal(nursery: trio.Nursery, ns: list[str], words: list[str], code: int, stdout: str) -> None:
    greeter = Greeter(Mode.OK, host="::1")
    await nursery.start(greeter.serve)
    run = await smtpdcheck(*ns, "--smtp-port", str(greeter.port), *words)
    assert (run.code, run.stdout, run.stderr) == (code, stdout, "")
    assert greeter.connections == (1 if code else 0)


# ------------------------------------------------------------ leaving politely


async def test_says_quit_to_the_server_it_reports(farm: Callable[..., Farm], ns: list[str]) -> None:
    f = await farm(Mode.OK)
    run = await smtpdcheck(*ns, *port(f), "127.0.0.2")
    assert run.code == 1
    greeter = f.greeters[0]
    with trio.fail_after(3):
        await greeter.wait_until(lambda: greeter.active == 0)
    assert greeter.received == [b"QUIT\r\n"]


@pytest.mark.parametrize("how", ["servers", "mx"])
async def test_says_quit_after_a_paused_multiline_greeting(
    farm: Callable[..., Farm], dns_server: FakeDNSServer, ns: list[str], how: str
) -> None:
    """220- then a 0.3 s pause (postscreen): the verdict comes from the first
    line; the rest of the greeting arrives well within the command's one-second
    grace, so the probe should finish it and say QUIT before the process exits."""
    f = await farm(Mode.PAUSED_MULTILINE, pause=0.3)
    dns_server.zone.update({
        ("d.example", "MX"): ["10 mx1.d.example.", "20 backup.d.example."],
        **zone_with_hosts({"mx1.d.example": ["127.0.0.2"], "backup.d.example": ["127.0.0.1"]}),
    })
    target = ["127.0.0.2"] if how == "servers" else ["--stop", "127.0.0.1", "--mx", "d.example"]
    run = await smtpdcheck(*ns, *port(f), "--timeout", "3", *target)
    assert run.code == 1
    greeter = f.greeters[0]
    with trio.fail_after(3):
        await greeter.wait_until(lambda: greeter.active == 0)
    assert greeter.pregreet == [b""]
    assert greeter.received == [b"QUIT\r\n"]
    assert greeter.closed_by_client == 0
