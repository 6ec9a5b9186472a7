"""Shell scripts -> one `script` segment; each command is judged with the line it is on.

This is a tokenizer-level reading (shlex), not a shell parser: control flow is flattened,
`$(...)` and backticks are read as commands of their own, here-documents are skipped.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

from hvtsm.analysis.model import Reason, Segment
from hvtsm.analysis.risk import make_segment
from hvtsm.errors import AnalysisError

_SEPARATORS = frozenset({";", "&&", "||", "|", "&", "|&", "(", ")", ";;", "{", "}", "!"})
_REDIRECT_WRITE = frozenset({">", ">>", ">|", "&>", "&>>"})
_KEYWORDS = frozenset({"if", "then", "else", "elif", "fi", "do", "done", "while", "until",
                       "esac", "in", "time", "[[", "]]", "function"})
#: commands that run the rest of their arguments as a command
_WRAPPERS = frozenset({"env", "nohup", "timeout", "nice", "ionice", "stdbuf", "command",
                       "builtin", "sudo", "doas", "setsid", "chronic"})
_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ash", "busybox"})
#: run by the shell itself: never an exec of a program
_BUILTINS = frozenset({":", ".", "source", "alias", "bg", "break", "cd", "continue", "echo",
                       "eval", "exec", "exit", "export", "false", "fg", "getopts", "hash",
                       "jobs", "kill", "local", "printf", "pwd", "read", "readonly", "return",
                       "set", "shift", "test", "[", "times", "trap", "true", "type", "ulimit",
                       "umask", "unalias", "unset", "wait", "let", "declare", "typeset",
                       "command", "builtin", "for", "case", "select"})
_FUNCTION_DEF = re.compile(r"^\s*(?:function\s+)?([A-Za-z_][\w-]*)\s*\(\s*\)", re.MULTILINE)
_RULES: dict[str, str] = {
    **dict.fromkeys(["curl", "wget", "nc", "ncat", "netcat", "ssh", "scp", "sftp", "telnet",
                     "ftp", "socat", "rsync"], "network"),
    **dict.fromkeys(["eval", "exec", "xargs"], "exec"),
    **dict.fromkeys(["rm", "mv", "cp", "dd", "tee", "truncate", "shred", "install", "rmdir"],
                    "file-write"),
    **dict.fromkeys(["mount", "umount", "insmod", "modprobe", "rmmod", "chroot", "sudo", "su",
                     "doas", "setcap", "nsenter", "unshare"], "privileged"),
    **dict.fromkeys(["strace", "ltrace", "gdb"], "ptrace"),
    **dict.fromkeys(["jq", "yq", "xmllint"], "input-parsing"),
}
_HARMLESS_TARGETS = ("/dev/null", "/dev/stdout", "/dev/stderr", "/dev/tty")


def _substitutions(text: str) -> tuple[str, list[str]]:
    """Cut `$(...)` and backtick commands out of a line; they are analyzed on their own."""
    out: list[str] = []
    inner: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$((", i):  # arithmetic, not a command
            out.append("$((")
            i += 3
        elif text.startswith("$(", i):
            depth, j = 1, i + 2
            while j < len(text) and depth:
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                j += 1
            inner.append(text[i + 2:j - 1])
            out.append("SUBST")
            i = j
        elif text[i] == "`":
            j = text.find("`", i + 1)
            j = len(text) if j < 0 else j
            inner.append(text[i + 1:j])
            out.append("SUBST")
            i = j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out), inner


def _tokens(text: str) -> list[str]:
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def _commands(tokens: list[str]) -> Iterator[tuple[list[str], bool]]:
    """Simple commands, each with whether it reads from a pipe."""
    current: list[str] = []
    piped = False
    for tok in tokens:
        if tok in _SEPARATORS:
            if current:
                yield current, piped
            piped = tok in ("|", "|&")
            current = []
        else:
            current.append(tok)
    if current:
        yield current, piped


class _Script:
    def __init__(self, file: str) -> None:
        self.file = file
        self.reasons: list[Reason] = []
        self.programs: set[str] = set()

    def add(self, cap: str, line: int, detail: str) -> None:
        self.reasons.append(Reason(cap, self.file, line, detail))

    def line(self, text: str, lineno: int) -> str | None:
        """Judge one logical line; return a here-document delimiter if one starts."""
        text, inner = _substitutions(text)
        for sub in inner:
            self.line(sub, lineno)
        try:
            tokens = _tokens(text)
        except ValueError as exc:
            raise AnalysisError(f"shell syntax: {exc}", file=self.file, line=lineno) from None
        heredoc = None
        for cmd, piped in _commands(tokens):
            heredoc = self.command(cmd, piped, lineno) or heredoc
        return heredoc

    def command(self, cmd: list[str], piped: bool, lineno: int) -> str | None:
        heredoc = None
        words: list[str] = []
        it = iter(range(len(cmd)))
        for i in it:
            tok = cmd[i]
            target = cmd[i + 1] if i + 1 < len(cmd) else ""
            if tok in _REDIRECT_WRITE:
                next(it, None)
                if target and not target.startswith(_HARMLESS_TARGETS):
                    self.add("file-write", lineno, f"{tok} {target}")
            elif tok in ("<<", "<<<", "<", ">&", "<&", "<>"):
                next(it, None)
                if tok == "<<":
                    heredoc = target.lstrip("-")
            else:
                words.append(tok)
        # leading assignments (FOO=bar cmd) are environment, not the command
        while words and "=" in words[0] and not words[0].startswith("="):
            name = words.pop(0).split("=", 1)[0]
            if name in ("LD_PRELOAD", "LD_LIBRARY_PATH"):
                self.add("native", lineno, f"{name}=")
        self.words(words, piped, lineno)
        return heredoc

    def words(self, words: list[str], piped: bool, lineno: int) -> None:
        while words and words[0] in _KEYWORDS:
            words = words[1:]
        if not words or words[0] in ("for", "case", "select"):
            return
        name = posixpath.basename(words[0])
        args = words[1:]
        if name not in _BUILTINS and "$" not in words[0] and "SUBST" not in words[0]:
            self.programs.add(words[0])
        summary = " ".join(words)[:80]
        cap = _RULES.get(name)
        if cap:
            self.add(cap, lineno, summary)
        if name in _SHELLS:
            if "-c" in args:
                self.add("exec", lineno, summary)
                script = args[args.index("-c") + 1:args.index("-c") + 2]
                if script:  # the programs that command string runs
                    self.line(script[0], lineno)
            elif piped and not [a for a in args if not a.startswith("-")]:
                # `curl ... | sh`: the shell runs whatever came down the pipe
                self.add("exec", lineno, f"{summary} (script from a pipe)")
        if name in ("source", ".") and args and "$" in args[0]:
            self.add("exec", lineno, summary)
        if name in _WRAPPERS or name in ("xargs", "exec"):
            rest = [a for a in args if not a.startswith("-") and "=" not in a]
            if name == "timeout" and rest:
                rest = rest[1:]
            if rest:
                self.words(rest, piped, lineno)


def analyze_shell(path: Path, text: str) -> list[Segment]:
    file = str(path)
    script = _Script(file)
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        start = i
        logical = lines[i]
        # backslash-newline continues a command; so does an open quote
        while i + 1 < len(lines) and (logical.endswith("\\") or _maybe_open_quote(logical)):
            logical = logical[:-1] + " " if logical.endswith("\\") else logical + "\n"
            i += 1
            logical += lines[i]
        i += 1
        if start == 0 and logical.startswith("#!"):
            continue
        delimiter = script.line(logical, start + 1)
        if delimiter:
            while i < len(lines) and lines[i].strip() != delimiter:
                i += 1
            i += 1
    # calls of the script's own functions are not programs
    programs = script.programs - set(_FUNCTION_DEF.findall(text))
    return [make_segment(path.name, "script", file, 1, script.reasons, programs)]


def _maybe_open_quote(text: str) -> bool:
    # tokenizing is the slow part; a line without quotes cannot leave one open
    return ("'" in text or '"' in text) and _open_quote(text)


def _open_quote(text: str) -> bool:
    try:
        _tokens(text)
    except ValueError:
        return True
    return False
