"""What the master runs beside its pools: the pidfile, the control socket, the metrics
endpoint, the cluster monitor, systemd's notify socket, and the files its workers write.

None of them may hold up the master's loop: the control socket is read as bytes arrive
(control.py), the metrics endpoint serves a copy of the status from its own thread
(metrics.py), the cluster monitor talks to Redis from its own thread (cluster.py), and a
notify datagram nobody reads is dropped (notify.py).

`prepare` runs before the sockets are bound (refuse to start beside a live poolmgr, hand the
workers' files to master.user, share dnspython's pages, raise the open files limit); `open`
once they are; `reload` after a reload; `close` at the end.
"""

__all__ = ["Services", "ROOT_WARNING"]

import os
import resource
import time

from . import cluster, control, log, maildir, metrics, pidfile, privileges
from .config import Config, format_address
from .heap import Trimmer
from .notify import Notifier
from .scanner import quarantine
from .upgrade import Upgrade

ROOT_WARNING = "running as root with [master] user unset: workers keep root privileges"
STATUS_EVERY = 1.0  # seconds between looks at the summary systemd shows (STATUS=)


class Services:
    def __init__(self, cfg: Config, logger):
        self.log = logger
        self.metrics = metrics.StatusCollector() if cfg.metrics.listen else None
        self.metrics_server = None
        self.notifier = Notifier()
        self.upgrade = Upgrade()
        self.heap = Trimmer()  # the master's: client state swept after a storm, given back
        self.status_sent_at = 0.0  # systemd's STATUS= line, at most every STATUS_EVERY
        self.cluster: cluster.Monitor | None = None
        self.control: control.ControlServer | None = None

    def prepare(self, cfg: Config) -> None:
        pidfile.check(cfg.master.pidfile, self.upgrade.predecessor)
        ids = cfg.master.ids
        if ids is not None and os.geteuid() != 0 and (os.getuid(), os.getgid()) != ids[1:]:
            raise SystemExit(f"fatal: [master] user {ids.user}: poolmgr must be started as "
                             f"root to run its workers as another user")
        self.hand_over_files(cfg)
        if cfg.defence.dnsbl_sites:
            # dnspython costs each SMTP worker nearly 7 MiB: imported here, its pages are
            # shared. It looks up `socket` when called, so gevent's patching still reaches it.
            import dns.resolver  # noqa: F401
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.log.info("open files limit: %d (hard limit %d)",
                      resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)

    def open(self, cfg: Config, selector) -> None:
        if self.metrics is not None:
            self.metrics_server = metrics.serve(cfg.metrics.listen, self.metrics, self.log)
        pidfile.write(cfg.master.pidfile)
        self.control = control.ControlServer(cfg.master.control_socket,
                                             cfg.master.control_socket_mode, selector,
                                             self.log)
        self.watch_cluster(cfg)
        for warning in cfg.warnings:
            self.log.warning("%s", warning)
        if cfg.master.ids is None and os.geteuid() == 0:
            self.log.warning("%s", ROOT_WARNING)
        self.log.info("daemon started -- version %s, configuration %s, smtp %s, scanner %s",
                      __import__("poolmgr").__version__, cfg.path,
                      "none (scanner-only)" if cfg.scanner_only else
                      ", ".join(map(format_address, cfg.smtp.listen)),
                      format_address(cfg.scanner.listen))

    def reload(self, cfg: Config) -> None:
        log.setup("poolmgr/master", cfg.master)
        self.hand_over_files(cfg)
        self.watch_cluster(cfg)

    def close(self, cfg: Config) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        if self.control is not None:
            self.control.close()
        self.notifier.close()
        pidfile.remove(cfg.master.pidfile)  # after a USR2 upgrade it is the successor's

    def fds(self) -> list[int]:
        """What a forked worker closes: the control socket and its clients, the metrics
        endpoint."""
        fds = self.control.fds() if self.control is not None else []
        if self.metrics_server is not None:
            fds.append(self.metrics_server.socket.fileno())
        return fds

    def hand_over_files(self, cfg: Config) -> None:
        """Create the files the workers write (the maildir next hop, the quarantine, the log
        file a worker reopens on USR1) and give them to master.user. A failure is logged; the
        workers meet it again (a scanner worker that cannot prepare its maildir dies at
        start-up, and its pool is throttled)."""
        try:
            hop = cfg.scanner.next_hop
            paths = maildir.prepare(hop.path) if hop.kind == "maildir" else []
            paths.append(log.file_of(cfg.master))
            if cfg.scanner.quarantine:
                paths += quarantine.prepare(cfg.scanner.quarantine)
            for path in paths:
                privileges.hand_over(path, cfg.master.ids)
        except OSError as exc:
            self.log.warning("cannot prepare %s for the workers: %s", exc.filename,
                             exc.strerror)

    def watch_cluster(self, cfg: Config) -> None:
        """Start (or, after a reload that changed [cluster], restart) the cluster's monitor."""
        if self.cluster is not None:
            if self.cluster.section == cfg.cluster:
                return
            self.cluster.stop()
            self.cluster = None
        if cluster.enabled(cfg.cluster):
            self.cluster = cluster.Monitor(cfg.cluster, self.log).start()

    def begin_upgrade(self, config_path: str | None, sockets: list, stopping: str) -> None:
        """USR2: start a new master from the installed code with the listening sockets; it
        stops this one once it serves (upgrade.py)."""
        upgrade = self.upgrade
        if stopping or upgrade.starting():
            self.log.warning("upgrade refused: %s", "poolmgr is stopping" if stopping else
                             f"a new master (pid {upgrade.successor}) is already starting")
            return
        if self.metrics_server is not None:  # its port is the new master's to bind
            metrics.stop(self.metrics_server)
            self.metrics_server = None
            self.log.info("upgrade: metrics endpoint closed for the new master")
        try:
            pid = upgrade.start(config_path, sockets)
        except OSError as exc:
            self.log.error("upgrade failed: cannot start a new master: %s", exc.strerror)
            return
        self.log.info("upgrade: started a new master, pid %d; this one stops once it serves",
                      pid)

    def relieve_predecessor(self) -> None:
        """The new master serves: the old one may stop."""
        self.log.info("upgrade: serving; stopping the old master, pid %d",
                      self.upgrade.relieve())

    def stopping(self) -> None:
        """Tell systemd the master stops (and, after a USR2 upgrade, which one it follows)."""
        if self.upgrade.starting():
            self.notifier.send(f"MAINPID={self.upgrade.successor}")
        self.notifier.stopping()

    def publish(self, make_status, decisions: int) -> None:
        """The copy of the status the metrics endpoint serves (once a second)."""
        if self.metrics is not None:
            self.metrics.publish(make_status(), decisions)

    def report(self, serving, summary, generation_ready: bool, slack: float) -> bool:
        """Tell systemd (notify.py): READY=1 when `generation_ready` is False and `serving()`
        (both pools serve this generation), STATUS=`summary()` when it changes (looked at once
        a second), WATCHDOG=1.
        True when READY=1 was sent."""
        notifier, ready = self.notifier, False
        if not notifier.enabled:
            return False
        if not generation_ready and serving():
            ready = True
            notifier.ready()
        now = time.monotonic()
        if ready or now - self.status_sent_at >= STATUS_EVERY:  # a summary builds a view
            self.status_sent_at = now
            notifier.status(summary())
        notifier.watchdog(now, slack=slack)
        return ready
