"""The training tools' restart onto glibc's huge-page malloc (`backend.restart_with_huge_pages`): when it happens,
what it sets, that it keeps the process."""

import os
import subprocess
import sys

import pytest

from mnist_jax.backend import HUGE_PAGES_OPT_OUT, huge_page_environment

from helpers import huge_pages_apply, without_huge_page_settings

GLIBC = ("glibc", "2.36")
MADVISE = "always [madvise] never\n"


def test_adds_the_tunable_on_a_recent_glibc_with_transparent_huge_pages():
    env = huge_page_environment({"PATH": "/bin"}, GLIBC, MADVISE)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert huge_page_environment({}, ("glibc", "2.35"), "[always] madvise never")["GLIBC_TUNABLES"] == \
        "glibc.malloc.hugetlb=1"


def test_keeps_the_users_other_tunables():
    env = huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, MADVISE)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ, libc, thp", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, MADVISE),  # the user's own choice wins (and no loop)
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, GLIBC, MADVISE),  # already restarted
    ({HUGE_PAGES_OPT_OUT: "0"}, GLIBC, MADVISE),                                 # opted out
    ({}, ("glibc", "2.34"), MADVISE),                                 # glibc without the tunable
    ({}, ("", ""), MADVISE),                                          # musl, or a libc Python cannot name
    ({}, GLIBC, "always madvise [never]\n"),                          # huge pages disabled by the kernel
    ({}, GLIBC, None),                                                # no THP support at all
])
def test_no_restart_where_it_cannot_help_or_is_already_done(environ, libc, thp):
    assert huge_page_environment(environ, libc, thp) is None


def test_restart_execs_the_same_command_with_the_tunable(monkeypatch, tmp_path):
    """`restart_with_huge_pages` in this process, its exec recorded instead of done: this interpreter, the original
    arguments, the environment `huge_page_environment` gives; nothing where it gives None. (The e2e test below
    execs for real.)"""
    from mnist_jax import backend

    class Exec(Exception):
        pass

    def execve(path, argv, env):
        raise Exec(path, argv, env)

    thp = tmp_path / "enabled"
    thp.write_text(MADVISE)
    monkeypatch.setattr(backend, "THP_SETTING", str(thp))
    monkeypatch.setattr(backend.platform, "libc_ver", lambda: GLIBC)
    monkeypatch.setattr(backend.sys, "platform", "linux")
    monkeypatch.setattr(backend.os, "execve", execve)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(HUGE_PAGES_OPT_OUT, raising=False)
    with pytest.raises(Exec) as restart:
        backend.restart_with_huge_pages()
    path, argv, env = restart.value.args
    assert path == sys.executable and argv == sys.orig_argv
    assert env == {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    monkeypatch.setenv(HUGE_PAGES_OPT_OUT, "0")
    backend.restart_with_huge_pages()  # returns: no exec
    monkeypatch.delenv(HUGE_PAGES_OPT_OUT)
    thp.unlink()  # no transparent huge pages in this kernel
    backend.restart_with_huge_pages()


SCRIPT = ("import os; from mnist_jax.backend import restart_with_huge_pages; restart_with_huge_pages(); "
          "print(os.getpid(), os.environ.get('GLIBC_TUNABLES', ''))")


def _run(extra_env: dict[str, str]) -> tuple[int, str, int]:
    env = without_huge_page_settings(os.environ) | extra_env
    process = subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = process.communicate(timeout=60)
    pid, _, tunables = out.strip().partition(" ")
    return int(pid), tunables, process.pid


@pytest.mark.e2e
@pytest.mark.skipif(not huge_pages_apply(), reason="needs Linux with glibc >= 2.35 and transparent huge pages")
def test_restart_sets_the_tunable_in_the_same_process():
    pid, tunables, launched_pid = _run({})
    assert tunables == "glibc.malloc.hugetlb=1"
    assert pid == launched_pid  # exec, not a child: signals, kill -9 and exit codes reach the real process
    pid, tunables, _ = _run({HUGE_PAGES_OPT_OUT: "0"})
    assert tunables == ""
