"""The demo's story: a shared incident report, three roles, and what the user says.

Kept apart from the demo's mechanics so the words can change without touching the code.
"""

INCIDENT_REPORT = """\
INCIDENT REPORT INC-2291 - Payment API failures during checkout (SEV-1, open)

Summary
Since 09:12 UTC on Tuesday the public Payments API (service payments-gateway, version 4.18.0)
returns HTTP 500 for about 7% of POST /v2/charges requests. Failures concentrate on card
payments that use a stored card token older than 30 days. Customers see "Payment could not be
processed" at checkout. Retries succeed about half of the time. Refunds and payouts are not
affected. The incident was declared SEV-1 at 09:40 UTC after the checkout conversion alarm fired.

Timeline (UTC)
- 08:55 Deploy of payments-gateway 4.18.0 to all regions (change CHG-7741). The release moved
  card token validation from the token-vault service into the gateway, added a new Redis-backed
  cache for token metadata (TTL 24h), and upgraded the HTTP client library from 2.3 to 3.0.
- 09:12 Error rate on /v2/charges rises from 0.05% to 6.8%. Latency p99 rises from 420 ms to
  2.9 s. The on-call engineer is paged by the "charges 5xx > 1%" alert.
- 09:25 First customer tickets arrive: 31 tickets in 15 minutes, all card payments.
- 09:31 Logs show "TokenExpiredError: token metadata missing field 'exp_month'" followed by an
  unhandled NullPointerException in ChargeService.authorize(). The stack trace points at
  TokenValidator.isExpired(), which reads card expiry from the cached metadata.
- 09:38 Token-vault reports normal error rates. Its responses for old tokens omit exp_month and
  exp_year when the card was tokenized before the 2023 schema migration; the old code path in
  token-vault filled those fields from the card network, the new gateway code does not.
- 09:40 SEV-1 declared. Incident commander: Priya N. Communications: Marco D.
- 09:52 Rollback of 4.18.0 attempted in eu-west; blocked because the database migration
  M-212 (adds column charges.token_checked_at) is not backward compatible with 4.17.
- 10:05 A feature flag, gateway.local_token_validation, exists but is read only at startup.
- 10:20 Status page updated: "Some card payments fail; retrying may help."
- 10:35 Error rate stable at 7%; about 1,900 failed charges so far; 4 enterprise merchants
  escalated through their account managers.

Technical details
- Affected code: payments-gateway/src/validation/TokenValidator.java, method isExpired(token),
  introduced in PR #4412. It assumes metadata.expMonth and metadata.expYear are never null.
- The Redis cache stores the metadata object exactly as token-vault returns it, so a missing
  field stays missing for 24 hours even after a fix in token-vault.
- The HTTP client upgrade changed the default read timeout from 10 s to 2 s; retries from the
  gateway to token-vault time out under load, which explains part of the latency increase.
- Idempotency keys are honored, so a customer retry does not double charge, but merchants that
  retry without an idempotency key may create duplicate authorizations (not yet observed).
- Database migration M-212 ran at 08:50 and added a nullable column; version 4.17 fails its
  schema check at startup when the column exists, which is why the rollback is blocked.
- Monitoring: Datadog dashboard "Payments / Charges", Sentry project payments-gateway, and the
  checkout funnel in Looker. Sentry groups the errors under issue PAY-GW-1187.

Business context
- Checkout handles about 27,000 charges per hour at this time of day; average order value is
  $64. At 7% failure and 50% successful retry, roughly 950 orders per hour are lost, about
  $60,800 per hour of gross merchandise value.
- Three enterprise merchants have contractual SLAs of 99.95% monthly availability with service
  credits of 10% of monthly fees when breached; the month's error budget is already 60% used.
- Marketing launches a holiday campaign at 16:00 UTC today, expected to double checkout traffic.
- Customer support has 140 open tickets; average handle time is 9 minutes.
- Finance needs an estimate of lost revenue and SLA credits for the daily report at 17:00 UTC.
- Legal asks whether any card data was exposed; current evidence says no: the failure is a
  null field, not an access control problem.

Constraints
- No schema changes during an active SEV-1 without the database owner's approval.
- Every production change needs a rollback plan and a second reviewer.
- Customer communication goes through Marco D.; no engineer posts on the status page directly.
- The fix must be deployable before 16:00 UTC, or the campaign must be postponed.

Open questions
1. What is the fastest safe mitigation: a hotfix that treats missing expiry as "not expired" and
   defers to the card network, a cache flush, flipping the feature flag with a restart, or a
   forward-fix of the rollback blocker?
2. How do we stop the stale Redis entries from keeping the bug alive after the fix?
3. What do we tell merchants, and when?
4. Should the holiday campaign be postponed?
"""

ROLES = {
    "specialist": (
        "Technical Specialist",
        "You are the Technical Specialist on the incident team. You find root causes in code, "
        "configuration and infrastructure, and you give precise, ordered engineering steps with the "
        "commands, files and checks involved. You are careful about rollbacks and data safety.",
    ),
    "analyst": (
        "Business Analyst",
        "You are the Business Analyst on the incident team. You quantify the impact on revenue, "
        "customers and contracts, and you recommend business decisions with their trade-offs. You "
        "speak plainly and give numbers.",
    ),
    "coordinator": (
        "Coordinator",
        "You are the Incident Coordinator. You combine the team's technical and business views into "
        "one action plan with owners, order and deadlines, and you keep communication consistent.",
    ),
}

SHORT_REPORT = (
    "INCIDENT INC-2291: since the 08:55 deploy of payments-gateway 4.18.0, 7% of card charges fail "
    "with HTTP 500. TokenValidator.isExpired() throws on old card tokens whose cached metadata lacks "
    "exp_month. Rollback is blocked by migration M-212. A holiday campaign starts at 16:00 UTC."
)

USER_REPORT = (
    "We have a critical API bug: card payments fail with HTTP 500 at checkout since this morning's "
    "deploy. What is going on and what should we do first?"
)

COORDINATOR_ASK = (
    "Here are the two assessments.\n\nTechnical Specialist:\n{specialist}\n\nBusiness Analyst:\n"
    "{analyst}\n\nWrite the action plan: numbered steps with an owner and a deadline each."
)

FOLLOW_UP = "What are the detailed steps to fix that API bug from our previous discussion?"


def system_prompt(role_key: str, short: bool = False) -> str:
    """A role's instructions followed by the shared brief."""
    _, instructions = ROLES[role_key]
    report = SHORT_REPORT if short else INCIDENT_REPORT
    return f"{instructions}\n\nThe team's shared brief follows.\n\n{report}"
