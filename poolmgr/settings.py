"""Every configuration setting, declared once.

Each `Setting` carries its section, key, type, default, bounds and help text. The loader
(`config.load`), `poolmgr check` and the documented default config (`conf/poolmgr.toml`,
printed by `poolmgr config`) all follow from this table. Names follow Postfix where Postfix
has the concept, and amavisd where it has (`max_requests`, ports 10024/10025).

Exports: Setting, SETTINGS, SECTION_HELP.
"""

from dataclasses import dataclass
from typing import Any

from .defence.verdicts import Action


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    kind: str  # str int float bool duration size address cidrs strlist nexthop filter path
    #            rules sites addresses
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()  # former names, still read (a config written for them works)

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


SECTION_HELP = {
    "master": "The master process: supervision, control socket, logging.",
    "smtp": "The SMTP pool: gevent workers that answer the public port.",
    "timeouts": (
        "Client-side timeouts used when poolmgr talks SMTP/LMTP to the scanner pool and to the\n"
        "next hop. Defaults are the minimums of RFC 5321 section 4.5.3.2."
    ),
    "scanner": "The scanner pool: amavisd-style content-scanner workers, one message at a time.",
    "defence": (
        "Storm defences in the SMTP pool (postscreen and anvil class). Actions: ignore (log only),\n"
        "enforce (answer, but reject every RCPT with 550 5.7.1 and the reason), drop (521, close).\n"
        "Stress mode ('poolmgr ctl stress on|off') gives every client the stress_* limits."
    ),
    "metrics": "The Prometheus metrics endpoint (prometheus_client), served by the master.",
    "autoscale": (
        "The autoscaler: every interval the master sizes the SMTP pool by the storm (occupancy,\n"
        "accept queue, nuisance ratio) and the scanner pool by legitimate volume, above the\n"
        "floors that min_workers and manual resizes set. 'poolmgr ctl autoscale off|on'."
    ),
}
ACTIONS = tuple(action.value for action in Action)

S = Setting
SETTINGS: tuple[Setting, ...] = (
    # [master]
    S("master", "control_socket", "path", "./var/poolmgr.sock",
      "Unix socket for 'poolmgr status' and 'poolmgr ctl'. Relative paths are taken from the\n"
      "directory poolmgr was started in."),
    S("master", "control_socket_mode", "int", 0o600,
      "Permission bits of the control socket (0o600: only the owner may resize pools).",
      min=0, max=0o777),
    S("master", "pidfile", "path", "./var/poolmgr.pid", "Where the master writes its process id."),
    S("master", "log_file", "path", "",
      "Log file; empty logs to stderr. SIGUSR1 reopens it (for logrotate)."),
    S("master", "graceful_timeout", "duration", "30s",
      "On SIGTERM or a reload, how long workers may finish their sessions before they are killed.",
      min=0, max=3600),
    S("master", "worker_timeout", "duration", "30s",
      "A worker whose heartbeat is older than this is hung: it is killed and replaced.\n"
      "A busy scanner worker gets scanner.timeout on top.", min=2, max=3600),
    S("master", "max_rss", "size", "0",
      "Any worker whose resident memory grows past this is recycled gracefully, unless its\n"
      "pool sets its own smtp.max_rss or scanner.max_rss. 0: no limit."),
    # [smtp]
    S("smtp", "listen", "address", "127.0.0.1:2525",
      "Address of the public SMTP port (host:port, [v6]:port). Use 0.0.0.0:25 in production."),
    S("smtp", "listen_backlog", "int", 1024,
      "Listen queue length of the SMTP socket (the kernel caps it at net.core.somaxconn). Former\n"
      "name: backlog.", min=1, max=65535, aliases=("backlog",)),
    S("smtp", "hostname", "str", "",
      "Name in the banner and Received: headers (Postfix: myhostname). Empty: the system's\n"
      "host name."),
    S("smtp", "min_workers", "int", 2,
      "SMTP workers at start, and the pool's floor.", min=1, max=128),
    S("smtp", "max_workers", "int", 8,
      "Ceiling of the SMTP pool.", min=1, max=128),
    S("smtp", "max_sessions_per_worker", "int", 2000,
      "Concurrent SMTP sessions one worker holds; further connections wait in the listen queue\n"
      "for another worker. Must stay below the open-files limit (RLIMIT_NOFILE).",
      min=1, max=1_000_000),
    S("smtp", "max_rss", "size", "0",
      "An SMTP worker whose resident memory grows past this is recycled gracefully: it stops\n"
      "accepting, finishes its sessions, and a fresh worker takes its place. 0: no limit."),
    S("smtp", "mydestination", "strlist", ["$myhostname", "localhost"],
      "Domains this server is the final destination for (Postfix: mydestination). Recipients in\n"
      "other domains are relayed only for clients in mynetworks. $myhostname is expanded."),
    S("smtp", "mynetworks", "cidrs", ["127.0.0.1/32", "::1/128"],
      "Networks of trusted clients that may relay (Postfix: mynetworks). The default trusts\n"
      "only this host, like Postfix's mynetworks_style = host."),
    S("smtp", "message_size_limit", "size", "25M",
      "Largest message accepted, in bytes (or 10k, 25M). Larger ones get 552 5.3.4\n"
      "(Postfix: message_size_limit).", min=1024),
    S("smtp", "max_recipients", "int", 1000,
      "Recipients per message; more get 452 4.5.3 (Postfix: smtpd_recipient_limit; RFC 5321\n"
      "section 4.5.3.1.8 requires at least 100).", min=100, max=100_000),
    S("smtp", "line_length_limit", "int", 2048,
      "Longest command line accepted, in bytes (Postfix: line_length_limit; RFC 5321 section\n"
      "4.5.3.1.4 asks for at least 512). Longer commands get 500 5.5.2.", min=512, max=65536),
    S("smtp", "timeout", "duration", "300s",
      "How long to wait for the client's next command or data line (Postfix: smtpd_timeout;\n"
      "RFC 5321 section 4.5.3.2.7: at least 5 minutes).", min=1, max=3600),
    S("smtp", "tls_cert", "path", "",
      "PEM certificate chain for STARTTLS. STARTTLS is offered only when this and tls_key are set."),
    S("smtp", "tls_key", "path", "", "PEM private key for STARTTLS."),
    S("smtp", "proxy_filter", "filter", "",
      "Where messages go at end of DATA (Postfix: smtpd_proxy_filter): [smtp:|lmtp:]host:port.\n"
      "Empty: the scanner pool (scanner.listen) over SMTP."),
    S("smtp", "proxy_timeout", "duration", "300s",
      "Longest hand-off of one message to the proxy filter, connect to final reply\n"
      "(Postfix: smtpd_proxy_timeout). On expiry the client gets 451 4.3.0.", min=1, max=3600),
    # [timeouts]
    S("timeouts", "connect", "duration", "30s",
      "Connecting to the scanner pool or the next hop (Postfix: smtp_connect_timeout).",
      min=0.1, max=600),
    S("timeouts", "greeting", "duration", "300s", "Waiting for the 220 banner (4.5.3.2.1).",
      min=0.1, max=3600),
    S("timeouts", "mail", "duration", "300s", "Reply to EHLO/LHLO, XFORWARD and MAIL (4.5.3.2.2).",
      min=0.1, max=3600),
    S("timeouts", "rcpt", "duration", "300s", "Reply to each RCPT (4.5.3.2.3).", min=0.1, max=3600),
    S("timeouts", "data_init", "duration", "120s", "Reply 354 to DATA (4.5.3.2.4).",
      min=0.1, max=3600),
    S("timeouts", "data_block", "duration", "180s", "Sending each block of message data (4.5.3.2.5).",
      min=0.1, max=3600),
    S("timeouts", "data_done", "duration", "600s",
      "Reply to the final dot (4.5.3.2.6). Bounded in practice by smtp.proxy_timeout and\n"
      "scanner.timeout.", min=0.1, max=3600),
    S("timeouts", "connection_cache_time_limit", "duration", "2s",
      "After a clean transaction the connection is kept this long for the next message to the\n"
      "same place, then closed with QUIT (Postfix: smtp_connection_cache_time_limit). The\n"
      "scanner workers cache their connection to the next hop. 0: one connection per message.",
      min=0, max=300),
    S("timeouts", "connection_reuse_time_limit", "duration", "300s",
      "A connection older than this is not cached again (Postfix:\n"
      "smtp_connection_reuse_time_limit).", min=1, max=3600),
    # [scanner]
    S("scanner", "listen", "address", "127.0.0.1:10024",
      "Address of the scanner pool (amavisd's port 10024). Speaks SMTP and LMTP, so Postfix can\n"
      "use it directly as content_filter."),
    S("scanner", "listen_backlog", "int", 128,
      "Listen queue length of the scanner socket. Former name: backlog.", min=1, max=65535,
      aliases=("backlog",)),
    S("scanner", "min_workers", "int", 2,
      "Scanner workers at start, and the pool's floor. Never more than smtp.min_workers.",
      min=1, max=128),
    S("scanner", "max_workers", "int", 4,
      "Ceiling of the scanner pool. Never more than smtp.max_workers.", min=1, max=128),
    S("scanner", "max_requests", "int", 1000,
      "A scanner worker is recycled after this many messages (amavisd: max_requests).",
      min=1, max=10_000_000),
    S("scanner", "max_rss", "size", "0",
      "A scanner worker whose resident memory grows past this is recycled after its current\n"
      "message. 0: no limit."),
    S("scanner", "timeout", "duration", "240s",
      "Longest time one message may take in a scanner worker, checks and re-injection included\n"
      "(amavisd: child_timeout). On expiry the message gets 451 4.3.0. Keep it below\n"
      "smtp.proxy_timeout.", min=1, max=3600),
    S("scanner", "next_hop", "nexthop", "maildir:./var/maildir",
      "Where scanned mail is re-injected: smtp:host:port (Postfix's 10025 listener),\n"
      "lmtp:host:port, or the embedded maildir:PATH (fsynced)."),
    S("scanner", "inet_acl", "cidrs", ["127.0.0.0/8", "::1/128"],
      "Clients allowed to connect to the scanner pool (amavisd: inet_acl). Others get 554 5.7.1.\n"
      "These clients may also send XFORWARD (Postfix: smtpd_authorized_xforward_hosts)."),
    S("scanner", "hostname", "str", "",
      "Name the scanner uses in its banner and headers. Empty: smtp.hostname."),
    S("scanner", "eicar", "bool", True,
      "Reject messages that carry the EICAR anti-virus test string (554 5.7.1)."),
    S("scanner", "rules", "rules", [],
      "Built-in header and body rules, checked in order, as an array of tables:\n"
      "  [[scanner.rules]]\n"
      "  name = \"no-lottery\"        # shown in the log and the X-Poolmgr-Scan header\n"
      "  header = \"Subject\"         # a header name; or  body = true  for the body\n"
      "  pattern = \"(?i)lottery\"    # a Python regular expression\n"
      "  action = \"reject\"          # reject (554 5.7.1) or tag (header only)"),
    # [defence]
    S("defence", "allowlist", "cidrs", [],
      "Networks that skip every test below (Postfix: postscreen_access_list permit)."),
    S("defence", "allowlist_file", "path", "",
      "A file of allowlisted networks, one CIDR per line, # comments."),
    S("defence", "denylist", "cidrs", [],
      "Networks that get denylist_action (Postfix: postscreen_access_list reject)."),
    S("defence", "denylist_file", "path", "",
      "A file of denylisted networks, one CIDR per line, # comments."),
    S("defence", "denylist_action", "str", "drop",
      "Action for denylisted clients (Postfix: postscreen_blacklist_action).", choices=ACTIONS),
    S("defence", "greet_wait", "duration", "2s",
      "The banner is sent in two parts ('220-' at once, '220 ' after this pause); a client that\n"
      "talks before the end is a bot (Postfix: postscreen_greet_wait). 0 turns the test off.",
      min=0, max=60),
    S("defence", "greet_action", "str", "enforce",
      "Action for clients that talk before the banner (Postfix: postscreen_greet_action).",
      choices=ACTIONS),
    S("defence", "greet_ttl", "duration", "1d",
      "A client that passed the greet test skips it for this long (Postfix: postscreen_greet_ttl).",
      min=0),
    S("defence", "dnsbl_sites", "sites", [],
      "DNS blocklists with optional reply filter and weight (Postfix: postscreen_dnsbl_sites),\n"
      "e.g. [\"zen.example*3\", \"bl.example=127.0.0.[2..11]*2\", \"allow.example=127.0.0.2*-2\"]."),
    S("defence", "dnsbl_threshold", "int", 1,
      "A client whose summed DNSBL weight reaches this gets dnsbl_action\n"
      "(Postfix: postscreen_dnsbl_threshold).", min=1),
    S("defence", "dnsbl_allowlist_threshold", "int", 0,
      "A client whose summed weight is at or below this negative number skips the other tests\n"
      "(Postfix: postscreen_dnsbl_allowlist_threshold); 0 turns it off.", max=0),
    S("defence", "dnsbl_action", "str", "enforce",
      "Action for clients at or above dnsbl_threshold (Postfix: postscreen_dnsbl_action).",
      choices=ACTIONS),
    S("defence", "dnsbl_timeout", "duration", "5s",
      "How long to wait for DNSBL answers, counted from connect; a site that has not answered\n"
      "by then scores nothing and the session goes on (Postfix: postscreen_dnsbl_timeout).",
      min=0.1, max=60),
    S("defence", "dnsbl_min_ttl", "duration", "60s",
      "Shortest time a DNSBL answer is cached (Postfix: postscreen_dnsbl_min_ttl).", min=0),
    S("defence", "dnsbl_max_ttl", "duration", "1h",
      "Longest time a DNSBL answer is cached (Postfix: postscreen_dnsbl_max_ttl).", min=0),
    S("defence", "nameservers", "addresses", [],
      "Resolvers for DNSBL queries, \"127.0.0.1:5353\" style (port 53 when left out). Empty: the\n"
      "nameservers in /etc/resolv.conf."),
    S("defence", "nuisance_window", "duration", "60s",
      "The sliding window of the nuisance ratio shown by 'poolmgr status'.", min=1, max=3600),
    S("defence", "suspicious_timeout", "duration", "60s",
      "smtp.timeout for suspicious clients: DNSBL score above zero, pregreet, enforced,\n"
      "improper pipelining, more than soft_error_limit errors.", min=1, max=3600),
    S("defence", "tarpit_delay", "duration", "0s",
      "Delay before every reply to a suspicious client (a tarpit); 0 turns it off.",
      min=0, max=60),
    S("defence", "client_connection_count_limit", "int", 50,
      "Simultaneous connections one client may hold, counted over all SMTP workers; over it\n"
      "gets 421 4.7.0 (Postfix: smtpd_client_connection_count_limit). 0: no limit.", min=0),
    S("defence", "client_connection_rate_limit", "int", 0,
      "Connections one client may open per anvil_rate_time_unit; over it gets 421 4.7.0\n"
      "(Postfix: smtpd_client_connection_rate_limit). 0: no limit.", min=0),
    S("defence", "client_message_rate_limit", "int", 0,
      "MAIL FROM commands one client may send per anvil_rate_time_unit; over it gets\n"
      "450 4.7.1 (Postfix: smtpd_client_message_rate_limit). 0: no limit.", min=0),
    S("defence", "client_recipient_rate_limit", "int", 0,
      "RCPT TO commands one client may send per anvil_rate_time_unit; over it gets 450 4.7.1\n"
      "(Postfix: smtpd_client_recipient_rate_limit). 0: no limit.", min=0),
    S("defence", "anvil_rate_time_unit", "duration", "60s",
      "The time unit of the rate limits above (Postfix: anvil_rate_time_unit). The counters\n"
      "are kept by the master for the whole host; smtp.mynetworks and the allowlist are exempt.",
      min=1, max=86400),
    S("defence", "soft_error_limit", "int", 10,
      "After this many errors (replies 4xx/5xx) a client waits error_sleep_time before each\n"
      "reply and gets the suspicious timeout (Postfix: smtpd_soft_error_limit).", min=0),
    S("defence", "error_sleep_time", "duration", "1s",
      "Delay before each reply once soft_error_limit is passed (Postfix:\n"
      "smtpd_error_sleep_time).", min=0, max=60),
    S("defence", "hard_error_limit", "int", 20,
      "After this many errors without delivering mail the client gets '421 4.7.0 Error: too\n"
      "many errors' and is disconnected (Postfix: smtpd_hard_error_limit).", min=1),
    S("defence", "junk_command_limit", "int", 100,
      "NOOP, RSET, VRFY and ETRN commands a client may send before each one counts as an\n"
      "error (Postfix: smtpd_junk_command_limit). Reset when mail is delivered.", min=1),
    S("defence", "reject_unauth_pipelining", "bool", False,
      "Refuse commands sent ahead of a reply where that is not allowed (before the banner,\n"
      "after HELO/EHLO/DATA, or without PIPELINING offered) with 503 5.5.0 (Postfix:\n"
      "reject_unauth_pipelining). Improper pipelining is logged, and makes the client\n"
      "suspicious, in any case."),
    S("defence", "recipients", "path", "",
      "A file of valid recipient addresses, one per line ('@example.com' accepts the whole\n"
      "domain), # comments. Mail for a domain that appears in it, to an address not in it,\n"
      "gets 550 5.1.1 at RCPT (Postfix: local_recipient_maps). Empty: no check."),
    S("defence", "stress_timeout", "duration", "10s",
      "smtp.timeout for every client in stress mode (Postfix: smtpd_timeout = ${stress?10}).",
      min=1, max=3600),
    S("defence", "stress_hard_error_limit", "int", 1,
      "hard_error_limit in stress mode (Postfix: smtpd_hard_error_limit = ${stress?1}).", min=1),
    S("defence", "stress_junk_command_limit", "int", 1,
      "junk_command_limit in stress mode (Postfix: smtpd_junk_command_limit = ${stress?1}).",
      min=1),
    # [metrics]
    S("metrics", "listen", "optaddress", "",
      "Address of the Prometheus metrics endpoint (http://ADDRESS/metrics), e.g.\n"
      "\"127.0.0.1:9425\". Empty: no endpoint. Changing it needs a restart."),
    # [autoscale]
    S("autoscale", "enabled", "bool", True,
      "Run the autoscaler. Off: pools stay at their floors (min_workers and manual resizes)."),
    S("autoscale", "interval", "duration", "1s",
      "How often the master takes a snapshot and decides.", min=0.1, max=60),
    S("autoscale", "storm_enter_occupancy", "float", 0.75,
      "A storm begins when pressure (live SMTP sessions / slots, or the accept queue / listen\n"
      "backlog, whichever is higher) reaches this while the nuisance ratio is at least\n"
      "storm_nuisance_ratio. During a storm the SMTP pool grows while pressure stays here.",
      min=0.01, max=1),
    S("autoscale", "storm_exit_occupancy", "float", 0.3,
      "A storm ends when pressure stays under this for cooldown; below storm_enter_occupancy.",
      min=0, max=1),
    S("autoscale", "storm_nuisance_ratio", "float", 0.5,
      "Nuisance share that makes high pressure a storm: the larger of the ratio over\n"
      "defence.nuisance_window and the share of live sessions that look like nuisance\n"
      "(a test fired, or silent since the banner).", min=0, max=1),
    S("autoscale", "step", "int", 1,
      "SMTP workers added per interval during a storm (twice as many while the accept queue\n"
      "keeps growing).", min=1, max=64),
    S("autoscale", "cooldown", "duration", "30s",
      "How long pressure must stay under storm_exit_occupancy before the storm is over and\n"
      "the extra SMTP workers are retired, one per interval, oldest first.", min=0),
    S("autoscale", "min_worker_lifetime", "duration", "10s",
      "No SMTP worker is retired sooner than this after the pool last grew, and the scanner\n"
      "pool does not shrink sooner than this after it last changed (no flapping).", min=0),
    S("autoscale", "calm_ratio", "float", 2.0,
      "When calm, at most this many SMTP workers per scanner worker, unless smtp's floor is\n"
      "higher.", min=1, max=100),
    S("autoscale", "stress", "bool", True,
      "Switch stress mode on when a storm holds the SMTP pool at its ceiling, and off when\n"
      "pressure falls under storm_exit_occupancy."),
    S("autoscale", "scanner_busy_high", "float", 0.8,
      "The scanner pool grows by one when this share of its workers has been busy for\n"
      "scanner_grow_after ...", min=0.01, max=1),
    S("autoscale", "handoff_wait_high", "duration", "2s",
      "... or when the mean hand-off (SMTP worker to next hop, through the scanner) took this\n"
      "long for scanner_grow_after.", min=0.01),
    S("autoscale", "scanner_grow_after", "duration", "5s",
      "How long scanner load must stay high before the scanner pool grows.", min=0),
    S("autoscale", "scanner_busy_low", "float", 0.2,
      "The scanner pool shrinks by one after scanner_shrink_after with at most this share of\n"
      "its workers busy.", min=0, max=1),
    S("autoscale", "scanner_shrink_after", "duration", "300s",
      "How long the scanner pool must be idle before it shrinks: slow, so that it does not flap.",
      min=1),
)
