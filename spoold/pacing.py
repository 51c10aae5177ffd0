"""Pure pacing: how fast one destination may send, learned from the service's throttling.

The pace is a rate in *shard units*: 1.0 is what one Kinesis shard takes, 1,000 records/s or
1 MiB/s, whichever binds first. A record costs ``max(1 / SHARD_RECORDS, size / SHARD_BYTES)``
unit-seconds, so one controller covers both limits: small records are paced by count, KPL
aggregates and big lines by bytes. Spending runs through a token bucket that may go into debt
(one record bigger than the bucket still goes, and the next waits for the debt to be paid),
so a 1 MiB aggregate is never stuck behind a bucket too small to hold it.

The controller is AIMD, not CUBIC:

- The signal is richer than TCP's: every PutRecords reply says which fraction of its records
  were throttled. A multiplicative decrease by that fraction takes the fleet's total straight
  back to what the shards accepted, whatever the number of hosts; CUBIC's cut is a fixed
  fraction and would have to relearn the level.
- AIMD's additive increase is what makes shares converge to fair ones (Chiu and Jain): hosts
  that share a stream get equal increments and proportional cuts. CUBIC's advantage, fast
  regrowth over long fat paths, does not apply at a few thousand records per second.
- At most one decrease per CUT_INTERVAL: a shard's bucket holds about a second of burst, so a
  throttle seen within a second of a cut still reflects the rate before it.
- A cut must pay. The throttled share is the same for every host feeding the same shards, so
  when the hosts cut, it falls. If it stays after FUTILE_CUTS cuts in a row, it is not about
  this rate (an injected fault, producers that never slow down): the rate is held and that share
  becomes a floor that later cuts ignore, slowly forgotten. Otherwise a fault that throttles a
  fixed share of records would grind the pace down to nothing.

Before the first throttle the pace doubles every SLOW_START_DOUBLING while it binds (TCP's slow
start), so a daemon alone reaches full speed within a second and a fleet started with a backlog
does not offer it all in the first round trip. When the pace does not bind it does not grow:
an idle daemon keeps no licence to burst.

Fair shares are made when slow start ends, and the cuts keep them: on a busy stream nearly
every epoch holds some throttling, so few epochs grow, and proportional cuts keep the ratios
between hosts. So a pace leaves slow start at what the stream accepted from it meanwhile (not at
a cut of the rate it reached, which depends on when its first throttle came), and the replies to
requests sent within EXIT_SETTLE of leaving do not count: they meet the overshoot of hosts still
in slow start, which would cut the hosts that left first twice. (The caller's part: batches wait
for a random share of the bucket, so that no host wins a shard's refill by a fixed phase.)
No clock is read here: callers pass ``now``.
"""

from __future__ import annotations

import math

# One Kinesis shard's limits, the unit the pace is counted in.
SHARD_RECORDS = 1000
SHARD_BYTES = 1024 * 1024
# Where a new destination starts (shard units), and the floor and ceiling of the pace.
INITIAL_RATE = 0.2
MIN_RATE = 0.02
MAX_RATE = 1e6
# Seconds of pace the bucket holds when full: small bursts, so a fleet does not all fire at once.
BURST = 0.1
# Additive increase per second while the pace binds and nothing is throttled: a fixed part plus
# a small share of the rate itself, so a lone daemon far below its stream's capacity regrows in
# seconds rather than minutes.
INCREASE_PER_S = 0.05
INCREASE_SHARE_PER_S = 0.0
# Largest cut at once.
MAX_CUT = 0.9
# A shard's bucket remembers about a second: the pace is judged once per such epoch, since
# evidence gathered within a second of a change still reflects the rate before it.
CUT_INTERVAL = 1.0
# Throttled share of an epoch tolerated without a cut.
TOLERANCE = 0.01
# Cuts in a row that leave the throttled share above this part of what it was, before that
# share is taken as not about our rate; how fast that floor is forgotten per calm epoch; and the
# share of the floor taken as noise.
FUTILE_CUTS = 3
FUTILE_SHARE = 0.5
FLOOR_DECAY = 0.9
FLOOR_NOISE = 0.25
# Leaving slow start, replies to requests sent within this many seconds are not held against the
# rate: they still meet the overshoot of hosts that have not left yet (slow start's last
# doublings, a round trip or two), and hosts that left first would be cut again for it, making
# their shares smaller for good.
EXIT_SETTLE = 0.3
# Throttled share of one reply that ends slow start: more than a fault's scattered throttles,
# less than what an emptied shard bucket answers.
SLOW_START_EXIT_SHARE = 0.25
# The cut on leaving slow start.
SLOW_START_EXIT_CUT = 0.5
# Slow start doubles the pace this often while it binds.
SLOW_START_DOUBLING = 0.1
# Leaving slow start, the pace is at most this many times what the stream accepted from us since
# the first reply: hosts that grew together took about as much each (a shard's burst hides the
# limit at first), whatever their rates when their first throttle came, so they leave about equal
# rather than keep a lucky host's lead. Once is enough: the burst made that figure generous.
SLOW_START_DELIVERED = 1.0


def cost(records: int, nbytes: int) -> float:
    """Shard unit-seconds that ``records`` records of ``nbytes`` bytes in all take."""
    return max(records / SHARD_RECORDS, nbytes / SHARD_BYTES)


class Pace:
    """One AIMD-controlled token bucket (a destination, or one shard of it)."""

    def __init__(self, now: float, rate: float = INITIAL_RATE, share: float = 1.0) -> None:
        self.rate = rate
        # This bucket's share of its destination (one of n shards: 1/n), which scales the
        # additive increase: a destination's paces together grow as fast as one would.
        self.share = share
        self.tokens = rate * BURST
        self.updated = now
        self.slow_start = True
        self.bound_at = -math.inf  # last time records waited for the bucket
        self.throttled = 0  # records the service throttled
        self.waited = 0.0  # seconds spent with records waiting for pace
        self.wait_from: float | None = None
        self.cuts = 0
        self._epoch_start = now
        self._offered = self._accepted = self._throttled = 0
        self._grown_at = now
        self._calm = 0  # epochs in a row with no cut
        # Throttling that cuts did not lower (see _end_epoch): cuts act on what exceeds it.
        self.floor = 0.0
        self._cut_fraction: float | None = None  # the throttled share that caused the last cut
        self._futile = 0  # cuts in a row after which that share did not fall
        self._first_reply: float | None = None  # slow start: since when replies came
        self._delivered = 0.0  # slow start: unit-seconds accepted since then
        self._cut_at = -math.inf  # when the rate last fell

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.rate * BURST, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def budget(self, now: float) -> float:
        """Unit-seconds that may be spent now (0 or less: wait)."""
        self._refill(now)
        return self.tokens

    def fork(self, now: float, rate: float, share: float) -> Pace:
        """A new pace at ``rate`` that has learned what this one has (in or out of slow start)."""
        pace = Pace(now, max(MIN_RATE * share, rate), share)
        pace.slow_start = self.slow_start
        return pace

    def wait(self, now: float) -> None:
        """Records wait for pace (the wait clock runs)."""
        self.bound_at = now
        if self.wait_from is None:
            self.wait_from = now

    def ready_at(self, now: float) -> float:
        """When the bucket is out of debt; marks the pace as binding (records are waiting)."""
        self._refill(now)
        self.wait(now)
        if self.tokens > 0:
            return now
        return now + (-self.tokens + 1e-9) / self.rate

    def ready_for(self, now: float, want: float, fill: float = 1.0) -> float:
        """When the bucket holds ``want`` unit-seconds (at most ``fill`` of its burst); marks the
        pace as binding, as ready_at does."""
        self._refill(now)
        self.bound_at = now
        short = min(want, self.rate * BURST * fill) - self.tokens
        return now if short <= 0 else now + (short + 1e-9) / self.rate

    def spend(self, now: float, units: float) -> None:
        self._refill(now)
        self.tokens -= units
        self.idle(now)

    def idle(self, now: float) -> None:
        """Nothing waits for pace (the wait clock stops)."""
        if self.wait_from is not None:
            self.waited += max(0.0, now - self.wait_from)
            self.wait_from = None

    def on_reply(self, now: float, units: float, records: int, accepted: int, throttled: int,
                 rtt: float) -> None:
        """A reply to a request of ``records`` records (``units`` of cost): ``accepted`` of them
        were accepted and ``throttled`` throttled."""
        self.throttled += throttled
        if now - rtt < self._cut_at:
            # Sent before the last cut: it tells the rate before it, already answered for.
            return
        if self.slow_start:
            if self._first_reply is None:
                self._first_reply = now
            elif records:
                self._delivered += units * accepted / records
        self._offered += records
        self._accepted += accepted
        self._throttled += throttled
        if self.slow_start:
            fraction = throttled / max(records, 1) - self.floor
            if fraction > SLOW_START_EXIT_SHARE:
                # At least halved: hosts that grew together leave together, at rates within a
                # factor of two, and the epochs refine the cut.
                self._leave_slow_start(now, SLOW_START_EXIT_CUT)
            elif now - self.bound_at <= CUT_INTERVAL:
                # By the clock, not per reply: hosts that start together grow together, whatever
                # their round trips, and leave slow start at about the same rate.
                # And never faster than the replies confirm (TCP's cwnd += acked: at most
                # doubling per round trip), however slow they come.
                dt = min(now - self._grown_at, CUT_INTERVAL)
                grown = min(self.rate * 2.0 ** (dt / SLOW_START_DOUBLING), self.rate + units / max(rtt, 1e-3))
                self.rate = min(MAX_RATE, max(self.rate, grown))
            self._grown_at = now
        if now - self._epoch_start >= CUT_INTERVAL:
            self._end_epoch(now)

    def on_whole_throttle(self, now: float, records: int, rtt: float) -> None:
        """A request of ``records`` records sent ``rtt`` seconds ago was throttled as a whole."""
        self.on_reply(now, 0.0, records, 0, records, rtt)

    def _leave_slow_start(self, now: float, fraction: float) -> None:
        self.slow_start = False
        if self._first_reply is not None and now - self._first_reply >= SLOW_START_DOUBLING:
            delivered = self._delivered / (now - self._first_reply)
            self.rate = min(self.rate, max(SLOW_START_DELIVERED * delivered, MIN_RATE * self.share))
        # The first epoch judges requests sent once the other hosts have left slow start too.
        self._epoch_start = now + EXIT_SETTLE
        self._offered = self._accepted = self._throttled = 0
        self.cuts += 1
        self._cut_at = now + EXIT_SETTLE
        self.rate = max(MIN_RATE * self.share, self.rate * (1.0 - min(MAX_CUT, fraction)))
        self.tokens = min(self.tokens, self.rate * BURST)

    def _end_epoch(self, now: float) -> None:
        span = now - self._epoch_start
        fraction = self._throttled / max(self._offered, 1)
        self._epoch_start = now
        self._offered = self._accepted = self._throttled = 0
        if self.slow_start:
            return
        excess = fraction - self.floor
        if excess > max(TOLERANCE, self.floor * FLOOR_NOISE):
            self._calm = 0
            if self._cut_fraction is not None and fraction >= self._cut_fraction * FUTILE_SHARE:
                self._futile += 1
            else:
                self._futile = 0
            if self._futile >= FUTILE_CUTS:
                # Cuts that do not lower the throttled share do not pay: this throttling is not
                # about our rate (a fault, or other producers that never slow down). Hold the
                # rate and cut only for throttling above this share from now on.
                self.floor = fraction
                self._futile = 0
                self._cut_fraction = None
                return
            self._cut_fraction = fraction
            self.cuts += 1
            self._cut_at = now
            self.rate = max(MIN_RATE * self.share, self.rate * (1.0 - min(MAX_CUT, excess)))
            self.tokens = min(self.tokens, self.rate * BURST)
            return
        self._cut_fraction = None
        self._futile = 0
        self.floor *= FLOOR_DECAY
        if now - self.bound_at <= CUT_INTERVAL:
            # The step doubles with each calm epoch in a row (BIC's max probing): small while
            # the stream stays near its limit, fast once capacity frees up (other hosts
            # finished), and never more than doubling the rate at once.
            step = (INCREASE_PER_S * self.share + INCREASE_SHARE_PER_S * self.rate) * span * 2.0 ** min(self._calm, 20)
            self.rate = min(MAX_RATE, self.rate + min(step, self.rate))
            self._calm += 1

    def records_per_s(self, unit_cost: float) -> float:
        """The pace in records/s for records of ``unit_cost`` each."""
        return self.rate / unit_cost if unit_cost > 0 else self.rate * SHARD_RECORDS
