"""The documentation stays true to the repository: links and anchors resolve, the flags
reference is the flags the job defines, named paths exist, flagfiles parse, the README stays
short, and no user-facing page names a path of somebody's machine outside a marked example.

The rules are docs/development.md's ("Documentation"); each checker also has a test on a bad
input, so a checker that stopped finding anything would fail too.
"""

import functools
import glob
import os
import re
import unicodedata

import pytest
from absl import flags

from helpers import REPO

README = os.path.join(REPO, "README.md")
FLAGS_PAGE = os.path.join(REPO, "docs", "reference", "flags.md")
README_MAX_LINES = 250
TEST_COMMAND = "bash scripts/test.sh"
QUICK_START = "bash scripts/run_local.sh --idx_dir=../shared/data/mnist"


def user_docs():
  """Every Markdown page a user reads: the README, the changelog, configs/ and docs/."""
  pages = [README, os.path.join(REPO, "CHANGELOG.md"), os.path.join(REPO, "configs", "README.md")]
  pages += sorted(glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True))
  return [p for p in pages if os.path.exists(p)]


def rel(path):
  return os.path.relpath(path, REPO)


# ---------------------------------------------------------------------------------------------
# Markdown, as much of it as these checks need.

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def split_blocks(text):
  """Yields (kind, first_line_number, lines): kind 'code' for a fenced block (fences
  excluded), 'text' for the lines between blocks."""
  lines = text.split("\n")
  i, start, buf = 0, 1, []
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if m:
      if buf:
        yield "text", start, buf
      fence, body, j = m.group(1), [], i + 1
      while j < len(lines) and not lines[j].lstrip().startswith(fence):
        body.append(lines[j])
        j += 1
      yield "code", i + 2, body
      i, start, buf = j + 1, j + 2, []
      continue
    buf.append(lines[i])
    i += 1
  if buf:
    yield "text", start, buf


def _strip_inline(text):
  """Heading text as GitHub renders it: code spans keep their content, links their text,
  emphasis and HTML markers go."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
  text = text.replace("`", "")
  text = re.sub(r"<[^>]+>", "", text)
  return re.sub(r"(\*\*|__|\*|(?<!\w)_|_(?!\w))", "", text)


def slug(heading):
  """GitHub's anchor for a heading (github-slugger): lower case; letters, marks, numbers,
  connector punctuation, spaces and hyphens kept, everything else dropped; spaces to '-'."""
  out = []
  for ch in _strip_inline(heading).strip().lower():
    cat = unicodedata.category(ch)
    if ch in " -" or cat[0] in "LMN" or cat == "Pc":
      out.append(ch)
  return "".join(out).replace(" ", "-")


def anchors(text):
  """Every heading anchor of a page, with GitHub's -1, -2 ... for repeats."""
  seen, result = {}, set()
  for kind, _, lines in split_blocks(text):
    if kind != "text":
      continue
    for line in lines:
      m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
      if not m:
        continue
      base = slug(m.group(1))
      n = seen.get(base, 0)
      result.add(base if n == 0 else f"{base}-{n}")
      seen[base] = n + 1
  return result


_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")


def links(text):
  """(line number, target) of every inline link, image and reference definition outside
  code blocks and code spans."""
  for kind, start, lines in split_blocks(text):
    if kind != "text":
      continue
    for offset, line in enumerate(lines):
      m = _REF_DEF.match(line)
      if m:
        yield start + offset, m.group(1)
        continue
      for link in _LINK.finditer(_CODE_SPAN.sub("", line)):
        yield start + offset, link.group(1)


def broken_links(page, text=None):
  """Relative links whose file or #anchor does not exist, as 'page:line: target (why)'."""
  if text is None:
    with open(page, encoding="utf-8") as f:
      text = f.read()
  problems = []
  for line, target in links(text):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...
      continue
    path, _, anchor = target.partition("#")
    dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    where = f"{rel(page)}:{line}: {target}"
    if os.path.relpath(dest, REPO).startswith(".."):
      problems.append(f"{where} (outside the repository)")
    elif not os.path.exists(dest):
      problems.append(f"{where} (no such file)")
    elif anchor:
      if not dest.endswith(".md"):
        problems.append(f"{where} (an anchor into a file that is not Markdown)")
        continue
      with open(dest, encoding="utf-8") as f:
        if anchor not in anchors(f.read()):
          problems.append(f"{where} (no such anchor)")
  return problems


# ---------------------------------------------------------------------------------------------
# Links and anchors.

@pytest.mark.parametrize("page", user_docs(), ids=rel)
def test_every_relative_link_and_anchor_resolves(page):
  assert broken_links(page) == []


def test_the_slugs_follow_githubs_rules():
  assert slug("`cpu-smoke` (kind, minikube)") == "cpu-smoke-kind-minikube"
  assert slug("4. Run: two edits, one `kubectl apply`") == "4-run-two-edits-one-kubectl-apply"
  assert slug("`result.json` (one model)") == "resultjson-one-model"
  assert slug("mixed_bfloat16") == "mixed_bfloat16"
  assert slug("2026-12-01: the 20-epoch recipe") == "2026-12-01-the-20-epoch-recipe"
  assert slug("Exit codes — and ≥ 4×") == "exit-codes--and--4"
  assert anchors("# A\n## A\n```\n# not a heading\n```\n### A\n") == {"a", "a-1", "a-2"}


def test_a_broken_link_or_anchor_is_found(tmp_path):
  page = os.path.join(REPO, "docs", "README.md")
  text = ("[ok](getting-started.md) [gone](no-such-page.md) [bad](getting-started.md#nowhere)\n"
          "[self](#nothing-here) `[in code](no-such.md)` [out](../../x.md)\n")
  found = broken_links(page, text)
  assert len(found) == 4, found
  assert any("no-such-page.md (no such file)" in p for p in found)
  assert any("#nowhere (no such anchor)" in p for p in found)
  assert any("#nothing-here (no such anchor)" in p for p in found)
  assert any("../../x.md (outside the repository)" in p for p in found)


# ---------------------------------------------------------------------------------------------
# The flags reference.

def _defined_flags():
  from trainer.flags import define_flags
  fv = flags.FlagValues()
  define_flags(fv)
  return {name: fv[name] for name in fv}


def documented_flags(text):
  """{flag name: default cell} of every table row whose first cell is `--name`."""
  rows = {}
  for line in text.splitlines():
    m = re.match(r"^\|\s*`--([a-z0-9_]+)`\s*\|([^|]*)\|", line)
    if m:
      assert m.group(1) not in rows, f"--{m.group(1)} is listed twice"
      rows[m.group(1)] = m.group(2).strip()
  return rows


def default_mismatch(flag, cell):
  """Why a default cell does not state `flag`'s default, or None. A cell starting with '—'
  means no default (None); otherwise its code spans give the default (all of them for a
  repeatable flag)."""
  default = flag.default
  literals = re.findall(r"`([^`]*)`", cell)
  if cell.startswith("—"):
    return None if default is None else f"says none, the code says {default!r}"
  if default is None:
    return f"says {cell!r}, the code has no default"
  if isinstance(default, list):
    return None if literals == default else f"says {literals}, the code says {default}"
  if not literals:
    return f"states no default in backticks: {cell!r}"
  said = literals[0]
  if isinstance(default, bool):
    ok = said == str(default).lower()
  elif isinstance(default, (int, float)):
    try:
      ok = float(said) == float(default)
    except ValueError:
      ok = False
  else:
    ok = said == str(default)
  return None if ok else f"says {said!r}, the code says {default!r}"


def test_the_flags_reference_lists_exactly_the_flags_the_job_defines():
  with open(FLAGS_PAGE, encoding="utf-8") as f:
    documented = documented_flags(f.read())
  defined = _defined_flags()
  assert sorted(set(defined) - set(documented)) == [], "defined but not documented"
  assert sorted(set(documented) - set(defined)) == [], "documented but not defined"
  wrong = {name: default_mismatch(defined[name], cell) for name, cell in documented.items()}
  assert {name: why for name, why in wrong.items() if why} == {}


def test_a_missing_flag_or_a_wrong_default_is_found():
  defined = _defined_flags()
  with open(FLAGS_PAGE, encoding="utf-8") as f:
    text = f.read()
  without = "\n".join(line for line in text.splitlines()
                      if not line.startswith("| `--lease_ttl_seconds`"))
  assert "lease_ttl_seconds" not in documented_flags(without)
  assert default_mismatch(defined["seed"], "`43`")
  assert default_mismatch(defined["litert"], "`false`")
  assert default_mismatch(defined["augment"], "`shift`")
  assert default_mismatch(defined["idx_dir"], "`x`")
  assert default_mismatch(defined["student"], "`labels_only:alpha=0,temperature=4`")
  assert default_mismatch(defined["learning_rate"], "`2e-3`") is None


# ---------------------------------------------------------------------------------------------
# Paths the docs name.

_REPO_PATH = re.compile(
    r"`((?:trainer|k8s|scripts|configs|tests|docker|benchmarks|docs)/[^`\s]*)`")


def missing_repo_paths(text):
  """Repository paths named in code spans that do not exist (globs must match something;
  placeholders such as <way> or … are not checked)."""
  missing = []
  for _, _, lines in (b for b in split_blocks(text) if b[0] == "text"):
    for line in lines:
      for path in _REPO_PATH.findall(line):
        path = path.rstrip(".,:;")
        if "<" in path or "…" in path or "..." in path:
          continue
        if not glob.glob(os.path.join(REPO, path)):
          missing.append(path)
  return missing


@pytest.mark.parametrize("page", user_docs(), ids=rel)
def test_every_repository_path_named_in_the_docs_exists(page):
  with open(page, encoding="utf-8") as f:
    assert missing_repo_paths(f.read()) == []


def test_a_path_that_does_not_exist_is_found():
  text = "`trainer/flags.py`, `trainer/no_such_module.py`, `k8s/overlays/<way>`, `docker/*.txt`"
  assert missing_repo_paths(text) == ["trainer/no_such_module.py"]


# Paths of the product itself, the same on every machine.
_PRODUCT_PATHS = re.compile(r"^(/tmp|/dev/shm|/usr/local/nvidia(/.*)?|/path/to/.*)$")
_ABSOLUTE = re.compile(r"(?<![\w.:/~>)\]}[*$-])(/[A-Za-z0-9._-][A-Za-z0-9._/-]*)")
_HOME = re.compile(r"(?<![\w/])(~/[^\s`'\")]*)")
_CLIMBING = re.compile(r"(?<![\w./-])((?:\.\./)+[A-Za-z0-9._-][^\s`'\")\]]*)")


@functools.lru_cache(maxsize=1)
def _repo_dirs():
  """The repository's folders (not hidden ones, run folders or build leftovers)."""
  skip = {"runs", "build", "dist", "__pycache__", "test-artifacts", "wheelhouse"}
  folders = []
  for folder, dirs, _ in os.walk(REPO):
    dirs[:] = [d for d in dirs if not d.startswith(".") and d not in skip
               and not d.endswith(".egg-info")]
    folders.append(folder)
  return tuple(folders)


def _inside_the_repository(relative):
  """True when a path with ../ names something in the repository from one of its folders
  (e.g. a kustomize overlay's ../../components/kueue)."""
  for folder in _repo_dirs():
    dest = os.path.normpath(os.path.join(folder, relative))
    if not os.path.relpath(dest, REPO).startswith("..") and os.path.exists(dest):
      return True
  return False


def _is_marked_example(text_lines):
  """A code block is a marked example when the paragraph just before it starts with
  'Example' (emphasis allowed)."""
  paragraph = []
  for line in reversed(text_lines):
    if not line.strip():
      if paragraph:
        break
      continue
    paragraph.insert(0, line)
  return bool(paragraph) and re.match(r"^[*_]*Example", paragraph[0].strip()) is not None


def outside_paths(text):
  """(line number, path) of every path outside the repository that a page names outside a
  marked example."""
  found, previous_text = [], []
  for kind, start, lines in split_blocks(text):
    if kind == "code" and _is_marked_example(previous_text):
      continue
    if kind == "text":
      previous_text = lines
    for offset, line in enumerate(lines):
      line = re.sub(r"\]\([^)]*\)", "]", line)  # link targets: test_every_relative_link...
      for path in _ABSOLUTE.findall(line):
        if not _PRODUCT_PATHS.match(path.rstrip(".,:;")):
          found.append((start + offset, path))
      found += [(start + offset, p) for p in _HOME.findall(line)]
      found += [(start + offset, p) for p in _CLIMBING.findall(line)
                if not _inside_the_repository(p.rstrip(".,:;"))]
  return found


@pytest.mark.parametrize("page", user_docs(), ids=rel)
def test_no_page_names_a_path_outside_the_repository_except_in_marked_examples(page):
  with open(page, encoding="utf-8") as f:
    assert outside_paths(f.read()) == []


def test_paths_outside_the_repository_are_found_unless_marked():
  text = "\n".join([
      "Results in /tmp/i16/mnist and `~/data`, MNIST at `../shared/data/mnist`.",
      "Fine: `/tmp`, `/dev/shm`, `/usr/local/nvidia/lib64`, `/path/to/data`, gs://b/x,",
      "https://example.com/a/b, `<model_dir>/teacher`, `k8s/base`, `../../components/kueue`,",
      "55,000 / 256, 8,235 examples/s, `$(bash scripts/setup_env.sh)/bin/activate`,",
      "`gs://BUCKET[/PREFIX]`, `teacher_logits/*/train.npy`.",
      "",
      "```sh",
      "mnist-distill --flagfile=/tmp/recipe20.flags",
      "```",
      "",
      "Example, on the CI machine:",
      "",
      "```sh",
      "bash scripts/run_local.sh --idx_dir=../shared/data/mnist",
      "```",
  ])
  assert outside_paths(text) == [(1, "/tmp/i16/mnist"), (1, "~/data"),
                                 (1, "../shared/data/mnist"), (8, "/tmp/recipe20.flags")]


# ---------------------------------------------------------------------------------------------
# Flagfiles, and the README.

@pytest.mark.parametrize(
    "flagfile", sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.flags"), recursive=True)),
    ids=rel)
def test_every_flagfile_parses_with_the_jobs_parser(flagfile, monkeypatch):
  from trainer.flags import parse_argv
  for name in ("JOB_COMPLETION_INDEX", "TF_CONFIG", "AIP_MODEL_DIR", "AIP_CHECKPOINT_DIR",
               "AIP_TENSORBOARD_LOG_DIR"):
    monkeypatch.delenv(name, raising=False)
  settings = parse_argv(["mnist-distill", f"--flagfile={flagfile}"])
  assert settings.students


def test_every_flagfile_is_listed_in_configs_readme():
  with open(os.path.join(REPO, "configs", "README.md"), encoding="utf-8") as f:
    index = f.read()
  files = glob.glob(os.path.join(REPO, "configs", "**", "*.flags"), recursive=True)
  unlisted = [rel(p) for p in files
              if f"({os.path.relpath(p, os.path.join(REPO, 'configs'))})" not in index]
  assert unlisted == []


def test_the_readme_is_short_and_keeps_its_two_commands():
  with open(README, encoding="utf-8") as f:
    text = f.read()
  assert len(text.splitlines()) <= README_MAX_LINES
  assert TEST_COMMAND in text  # .ci/run runs exactly this
  first_command = re.search(r"^```sh\n(.*?)\n```", text, re.M | re.S)
  assert first_command and first_command.group(1) == QUICK_START, "the quick start's command"
  assert os.path.exists(os.path.join(REPO, "scripts", "run_local.sh"))
