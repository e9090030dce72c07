"""A private rspamd (Debian's package) on a loopback port: one normal worker, no controller or
proxy, only the modules a test needs (so no Redis, DNS or HTTP lookups: it works offline), its
config, log, databases, caches and DKIM key in a temp dir.

rspamd still knows GTUBE without any module (action reject, symbol GTUBE). Rules of ours:
POOLMGR_ENVELOPE (score 0.5) hits every message and lists in its options the envelope rspamd
was given: ip=, from=, rcpt= (comma-separated), helo=, qid=, hostname=. A Subject
`force ACTION` or `force ACTION (any text)` (greylist, add header, rewrite subject) scores
into that action's range; `force ACTION: TEXT` sets ACTION as rspamd's pre-result with TEXT
as its SMTP message (e.g. `force soft reject: Ratelimit exceeded`). milter_headers adds
X-Spamd-Result and X-Rspamd-Queue-Id at the end of the header, X-Poolmgr-Top at the top, and
removes every X-Drop-Me; dkim_signing signs mail From: DKIM_DOMAIN (selector DKIM_SELECTOR)
with a key made at start (`dkim_public_key`, PEM).
"""

__all__ = ["Rspamd", "ENVELOPE_SYMBOL", "DKIM_DOMAIN", "DKIM_SELECTOR"]

import http.client
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from .wait import WaitTimeout, free_port, wait_until

ENVELOPE_SYMBOL = "POOLMGR_ENVELOPE"
DKIM_DOMAIN, DKIM_SELECTOR = "dkim.example", "poolmgr"
PLUGINS = Path("/usr/share/rspamd/plugins")

RSPAMD_CONF = """\
options {{
  filters = "dkim";  # the C module dkim_signing signs with
  pidfile = "{dir}/rspamd.pid";
  dbdir = "{dir}/db";
  hs_cache_dir = "{dir}/db";
  tempdir = "{dir}/tmp";
  # Nothing should resolve anything; if something tries, it gets no answer, fast.
  dns {{ nameserver = ["127.0.0.1:9"]; timeout = 1s; retransmits = 1; }}
}}
logging {{ type = "file"; filename = "{dir}/rspamd.log"; level = "info"; }}
actions {{ reject = 15; rewrite_subject = 8; add_header = 6; greylist = 4; subject = "[SPAM] %s"; }}
lua = "{dir}/rules.lua";
modules {{ path = "{dir}/plugins"; }}
milter_headers {{
  use = ["x-spamd-result", "x-rspamd-queue-id", "poolmgr-edits"];
  skip_local = false;
  skip_authenticated = false;
  custom {{
    poolmgr-edits = <<EOD
return function(task, common)
  return nil, {{['X-Poolmgr-Top'] = {{value = 'first', order = 0}}}}, {{['X-Drop-Me'] = 0}}, {{}}
end
EOD;
  }}
}}
dkim {{ }}
dkim_signing {{
  sign_local = true;
  sign_inbound = true;
  allow_hdrfrom_mismatch = true;
  use_esld = false;
  domain {{ "{dkim_domain}" {{ selector = "{dkim_selector}"; path = "{dir}/dkim.key"; }} }}
}}
worker "normal" {{ bind_socket = "127.0.0.1:{port}"; count = 1; }}
"""

RULES_LUA = """\
rspamd_config:register_symbol({
  name = '%s', score = 0.5, group = 'poolmgr',
  callback = function(task)
    local ip = task:get_from_ip()
    local from = task:get_from('smtp')
    local rcpts = {}
    for _, rcpt in ipairs(task:get_recipients('smtp') or {}) do
      table.insert(rcpts, rcpt.addr)
    end
    task:insert_result('%s', 1.0, {
      'ip=' .. (ip and ip:is_valid() and ip:to_string() or ''),
      'from=' .. (from and from[1] and from[1].addr or ''),
      'rcpt=' .. table.concat(rcpts, ','),
      'helo=' .. (task:get_helo() or ''),
      'qid=' .. (task:get_queue_id() or ''),
      'hostname=' .. (task:get_hostname() or ''),
    })
  end,
})

rspamd_config:register_symbol({
  name = 'POOLMGR_FORCE', score = 1.0, group = 'poolmgr',
  callback = function(task)
    local subject = task:get_subject() or ''
    local action, text = subject:match('^force ([%%a ]+): (.+)$')
    if action then
      task:set_pre_result(action, text, 'poolmgr')
      return
    end
    local weights = {['greylist'] = 4.5, ['add header'] = 6.5, ['rewrite subject'] = 8.5}
    action = subject:match('^force ([%%a ]+)$') or subject:match('^force ([%%a ]-) %%(.*%%)$')
    if weights[action] then
      task:insert_result('POOLMGR_FORCE', weights[action], action)
    end
  end,
})
""" % (ENVELOPE_SYMBOL, ENVELOPE_SYMBOL)


class Rspamd:
    """A private rspamd: `start()`, `url`, `log()`, `stop()`. Start-up takes ~10s (rspamd
    compiles its list of TLDs), so tests share one per module."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"poolmgr-rspamd-{self.port}-"))
        self.proc: subprocess.Popen | None = None
        self.dkim_public_key = self.dir / "dkim.pub"

    def start(self, timeout: float = 90.0) -> "Rspamd":
        (self.dir / "db").mkdir()
        (self.dir / "tmp").mkdir()
        (self.dir / "rules.lua").write_text(RULES_LUA)
        (self.dir / "plugins").mkdir()
        for plugin in ("milter_headers.lua", "dkim_signing.lua"):
            (self.dir / "plugins" / plugin).symlink_to(PLUGINS / plugin)
        key = self.dir / "dkim.key"
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True,
                       capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-out",
                        str(self.dkim_public_key)], check=True, capture_output=True)
        config = self.dir / "rspamd.conf"
        config.write_text(RSPAMD_CONF.format(dir=self.dir, port=self.port,
                                             dkim_domain=DKIM_DOMAIN,
                                             dkim_selector=DKIM_SELECTOR))
        # -f: stay in the foreground, our child; -i: let root run the workers (the temp dir is
        # root's), harmless for anyone else.
        command = [shutil.which("rspamd") or "/usr/bin/rspamd", "-f", "-i", "-c", str(config)]
        with open(self.dir / "stderr", "wb") as stderr:
            self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr,
                                         start_new_session=True)
        try:
            wait_until(self._ready, timeout=timeout, interval=0.2, what="rspamd's /ping")
        except WaitTimeout as exc:
            output = self._output()
            self.stop()
            raise WaitTimeout(f"{exc}; rspamd said:\n{output}") from None
        except Exception:
            self.stop()
            raise
        return self

    def _output(self) -> str:
        stderr = (self.dir / "stderr").read_text(errors="replace")
        return stderr[-2000:] + self.log()[-2000:]

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"rspamd exited with status {self.proc.returncode}:\n"
                               f"{self._output()}")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/ping")
            return conn.getresponse().read().strip() == b"pong"
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def log(self) -> str:
        path = self.dir / "rspamd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Stop rspamd (SIGTERM to its main process, which stops its workers; SIGKILL to its
        process group if that takes too long) and remove its directory."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc:
            try:  # workers that outlived their main process
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
