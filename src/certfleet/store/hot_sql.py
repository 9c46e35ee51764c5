"""The SQL of the hot path, written once with :name parameters for SQLite and PostgreSQL.

Plain SQL rather than SQLAlchemy statements: the hot path runs it on the raw
drivers (sqlite3, asyncpg), where building or compiling a statement per request
would cost more than running it. tests/test_store_hot_path*.py run every
statement on both databases. `numbered` rewrites a statement for asyncpg.
"""

from __future__ import annotations

import re
from functools import cache

# EST renewal: the client certificate, its device and factory, whether it is
# deny-listed, the CA that issued it (if it belongs to the device's factory)
# and this server's issuing CA (if it belongs to the request's factory).
CLIENT = """
SELECT c.id, c.serial, c.device_uuid, d.factory_id, f.name, d.deleted_at,
       EXISTS (SELECT 1 FROM denylist AS x WHERE x.cert_sha256 = :sha256),
       ica.name, ica.status, ica.status_changed_at,
       oca.name, oca.status
FROM certificates AS c
LEFT JOIN devices AS d ON d.uuid = c.device_uuid
LEFT JOIN factories AS f ON f.id = d.factory_id
LEFT JOIN cas AS ica ON ica.id = c.issuer_ca_id AND ica.factory_id = d.factory_id
LEFT JOIN cas AS oca ON oca.id = :issuing_ca_id AND oca.factory_id = :factory_id
WHERE c.sha256 = :sha256
"""

INSERT_CERTIFICATE = """
INSERT INTO certificates (serial, sha256, subject, pubkey_sha256, issuer_ca_id, device_uuid,
                          not_before, not_after, status, cert_pem, issued_by_request, created_at)
VALUES (:serial, :sha256, :subject, :pubkey_sha256, :issuer_ca_id, :device_uuid,
        :not_before, :not_after, 'active', :cert_pem, :issued_by_request, :now)
"""

INSERT_EVENT = """
INSERT INTO outbox (topic, device_uuid, payload, created_at, attempts, next_attempt_at)
VALUES (:topic, :device_uuid, :payload, :now, 0, :now)
"""

INSERT_AUDIT = """
INSERT INTO audit_log (at, actor, action, target, details)
VALUES (:now, :actor, :action, :device_uuid, :details)
"""

# PostgreSQL writes all three rows in one round trip.
ISSUE_IN_ONE = f"""
WITH cert AS ({INSERT_CERTIFICATE} RETURNING id),
     event AS ({INSERT_EVENT}),
     entry AS ({INSERT_AUDIT})
SELECT id FROM cert
"""

# Gateway check-in: the columns of store.certificates.checkin with the config's
# last change (as store.config_files.device_config_changed) and the change
# counter, all from one snapshot.
CHECKIN = """
SELECT c.id, c.serial, c.status, c.pubkey_sha256, c.not_before, c.not_after, c.device_uuid,
       d.factory_id, d.group_name, d.current_cert_id, d.next_pubkey_sha256, d.config_locked,
       d.last_seen_at, d.deleted_at, d.created_at, d.registered_via,
       ca.name, ca.status, ca.status_changed_at,
       (SELECT max(l.changed_at) FROM config_log AS l
        WHERE l.factory_id = d.factory_id
          AND ((l.scope = 'factory' AND l.scope_key = '')
               OR (l.scope = 'group' AND l.scope_key = d.group_name)
               OR (l.scope = 'device' AND l.scope_key = d.uuid))),
       (SELECT g.generation FROM change_counter AS g WHERE g.id = 1)
FROM certificates AS c
LEFT JOIN devices AS d ON d.uuid = c.device_uuid
LEFT JOIN cas AS ca ON ca.id = c.issuer_ca_id
WHERE c.sha256 = :sha256
"""

MARK_SEEN = "UPDATE devices SET last_seen_at = :at WHERE uuid = :device_uuid"

# The files of store.config_files.files_for_device; a None group matches no group file.
CONFIG_FILES = """
SELECT name, scope, value, on_changed, unencrypted FROM config_files
WHERE factory_id = :factory_id
  AND ((scope = 'factory' AND scope_key = '')
       OR (scope = 'group' AND scope_key = :group_name)
       OR (scope = 'device' AND scope_key = :device_uuid))
ORDER BY name, scope
"""

DENIED_AFTER = """
SELECT id, cert_sha256 FROM denylist WHERE id > :after_id ORDER BY id LIMIT :page_size
"""

# The ids travel as one JSON array (SQLite) or one integer array (PostgreSQL).
DENIED_AMONG_SQLITE = """
SELECT id, cert_sha256 FROM denylist WHERE id IN (SELECT value FROM json_each(:ids))
"""
DENIED_AMONG_POSTGRESQL = "SELECT id, cert_sha256 FROM denylist WHERE id = ANY($1::integer[])"

GENERATION = "SELECT generation FROM change_counter WHERE id = 1"

_PARAMETER = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


@cache
def numbered(sql: str) -> tuple[str, tuple[str, ...]]:
    """`sql` with :name parameters as asyncpg's $1, $2, ... and the names in that order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _PARAMETER.sub(number, sql), tuple(names)
