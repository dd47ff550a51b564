//! Loss figures: one window's ([`loss_pct`]) and a sustained one over the last few windows
//! ([`SustainedLoss`]), both lost over sent segments.
//!
//! Why a sustained figure: a node that loses 0.5 % of 400 segments a second loses two a
//! second. Its one-second figures jump between 0 and 1.5 %, under every per-window step and
//! within its peers' noise (the matrix caught it in 1 run of 3). Pooled over ten windows the
//! same node sits at 0.45 % ± 0.1, well clear of healthy peers at 0.05 %: counting over a
//! longer span is what tells a light steady loss from noise.
//!
//! Why each window's count is capped: one burst (a congested flow's tail drop, a TLP storm)
//! must not pass for a steady rate. A window adds at most one lost segment more than a 0.5 %
//! loss would lose in it ([`capped_lost`]), so a rate shows up only when most windows carry
//! it. Heavy loss is unaffected in practice: the per-window figure catches it first.

use std::collections::VecDeque;

/// The loss figure of one window towards one peer (or a whole node), in percent: segments lost
/// over segments sent. Lost are the retransmitted segments plus the connection attempts nobody
/// answered; sent are the data segments (retransmissions included, pure ACKs not: they are never
/// retransmitted) plus those attempts (each sent a SYN that got no answer). Loss with nothing
/// acknowledged is 100 %: a blackhole acknowledges nothing, which is total loss, not "no data".
/// Capped at 100.
#[must_use]
pub fn loss_pct(retransmits: u64, unanswered_connects: u64, segments_sent: u64) -> f64 {
    match lost_and_sent(retransmits, unanswered_connects, segments_sent) {
        (0, _) => 0.0,
        (_, 0) => 100.0,
        (l, s) => (100.0 * l as f64 / s as f64).min(100.0),
    }
}

/// The segments lost and sent that [`loss_pct`] divides: retransmits plus unanswered connection
/// attempts, and data segments plus those attempts (each one SYN sent and lost).
#[must_use]
pub fn lost_and_sent(retransmits: u64, unanswered_connects: u64, segments_sent: u64) -> (u64, u64) {
    (
        retransmits.saturating_add(unanswered_connects),
        segments_sent.saturating_add(unanswered_connects),
    )
}

/// Windows the sustained figure pools (ten one-second windows by default).
pub const SUSTAINED_LOSS_WINDOWS: usize = 10;

/// Segments the span must have sent before its figure says anything: at fewer, a 0.5 % loss
/// loses under ten segments in the span, too few to tell from chance.
pub const SUSTAINED_LOSS_MIN_SENT: u64 = 2_000;

/// The smallest sustained figure's rise that matters, in points. Half the per-window step
/// ([`crate::Family::min_change`]): pooling ten windows cuts the noise by √10, and with the cap
/// one burst adds at most 0.2 points to a span that sent [`SUSTAINED_LOSS_MIN_SENT`].
pub const SUSTAINED_LOSS_MIN_CHANGE: f64 = 0.25;

/// The most lost segments one window adds to the span: one more than a 0.5 % loss of `sent`.
#[must_use]
pub fn capped_lost(lost: u64, sent: u64) -> u64 {
    lost.min(1 + sent.div_ceil(200))
}

/// Lost and sent segments over the last `windows` windows (lost capped per window).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LossSpan {
    pub lost: u64,
    pub sent: u64,
    pub windows: u32,
}

impl LossSpan {
    /// The span's loss in percent (see [`loss_pct`]; 0 when nothing was sent).
    #[must_use]
    pub fn pct(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            (100.0 * self.lost as f64 / self.sent as f64).min(100.0)
        }
    }

    /// Whether the span is full and sent enough to be judged.
    #[must_use]
    pub fn is_judgeable(&self) -> bool {
        self.windows as usize >= SUSTAINED_LOSS_WINDOWS && self.sent >= SUSTAINED_LOSS_MIN_SENT
    }
}

/// Sliding span of the last [`SUSTAINED_LOSS_WINDOWS`] windows' lost and sent segments.
#[derive(Debug, Clone, Default)]
pub struct SustainedLoss {
    windows: VecDeque<(u64, u64)>,
    span: LossSpan,
}

impl SustainedLoss {
    /// Adds one window: `lost` (retransmits plus unanswered attempts) of `sent` (data segments
    /// plus unanswered attempts); the oldest window leaves a full span.
    pub fn push(&mut self, lost: u64, sent: u64) {
        let lost = capped_lost(lost, sent);
        if self.windows.len() == SUSTAINED_LOSS_WINDOWS
            && let Some((old_lost, old_sent)) = self.windows.pop_front()
        {
            self.span.lost -= old_lost;
            self.span.sent -= old_sent;
        }
        self.windows.push_back((lost, sent));
        self.span.lost = self.span.lost.saturating_add(lost);
        self.span.sent = self.span.sent.saturating_add(sent);
        self.span.windows = u32::try_from(self.windows.len()).unwrap_or(u32::MAX);
    }

    /// A window whose loss could not be counted (the kernel lacks a counter): the span starts
    /// over rather than pool counted and uncounted windows.
    pub fn clear(&mut self) {
        self.windows.clear();
        self.span = LossSpan::default();
    }

    /// The current span.
    #[must_use]
    pub fn span(&self) -> LossSpan {
        self.span
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn nothing_acknowledged_is_total_loss_and_nothing_retransmitted_none() {
        assert!((loss_pct(3, 0, 0) - 100.0).abs() < 1e-12);
        assert!(loss_pct(0, 0, 0).abs() < 1e-12);
        assert!((loss_pct(1, 0, 200) - 0.5).abs() < 1e-12);
        assert!((loss_pct(500, 0, 100) - 100.0).abs() < 1e-12, "capped");
    }

    #[test]
    fn unanswered_connects_are_lost_segments_of_their_own() {
        // A peer reached only by attempts nobody answered: total loss, though nothing was
        // retransmitted and no data segment sent.
        assert!((loss_pct(0, 2, 0) - 100.0).abs() < 1e-12);
        // One unanswered attempt beside a busy healthy connection is a small share.
        assert!((loss_pct(0, 1, 999) - 0.1).abs() < 1e-12);
        assert!((loss_pct(1, 1, 199) - 1.0).abs() < 1e-12);
    }

    /// Two lost of 400 a second, the bench's 0.5 % loss: per window the figure jumps between 0
    /// and 1.5 %; over the span it is the rate itself.
    #[test]
    fn a_light_steady_loss_shows_its_rate_over_the_span() {
        let mut span = SustainedLoss::default();
        for lost in [2, 1, 3, 2, 2, 3, 2, 1, 2, 2] {
            span.push(lost, 400);
        }
        let s = span.span();
        assert!(s.is_judgeable(), "{s:?}");
        assert_eq!((s.lost, s.sent, s.windows), (20, 4_000, 10));
        assert!((s.pct() - 0.5).abs() < 1e-12, "{}", s.pct());
    }

    /// One burst of 40 lost segments among clean windows adds 3 (one more than 0.5 % of 400),
    /// not 40: 0.075 points over the span, under the sustained step.
    #[test]
    fn one_burst_does_not_pass_for_a_steady_rate() {
        let mut span = SustainedLoss::default();
        span.push(40, 400);
        for _ in 1..SUSTAINED_LOSS_WINDOWS {
            span.push(0, 400);
        }
        let s = span.span();
        assert_eq!(s.lost, 3);
        assert!(s.pct() < SUSTAINED_LOSS_MIN_CHANGE, "{}", s.pct());
        // Once the burst's window has left the span, nothing of it remains.
        span.push(0, 400);
        assert_eq!(span.span().lost, 0);
    }

    #[test]
    fn a_short_or_quiet_span_is_not_judged() {
        let mut span = SustainedLoss::default();
        for _ in 0..SUSTAINED_LOSS_WINDOWS - 1 {
            span.push(0, 1_000);
        }
        assert!(!span.span().is_judgeable(), "not full yet");
        span.push(0, 1_000);
        assert!(span.span().is_judgeable());
        let mut quiet = SustainedLoss::default();
        for _ in 0..SUSTAINED_LOSS_WINDOWS {
            quiet.push(1, 150);
        }
        assert!(!quiet.span().is_judgeable(), "1,500 sent: a loss figure from chance");
        quiet.clear();
        assert_eq!(quiet.span(), LossSpan::default());
    }

    proptest! {
        /// The span always equals the sum of its last windows' capped counts, however many
        /// windows came before.
        #[test]
        fn the_span_is_the_sum_of_its_last_windows(windows in prop::collection::vec((0u64..500, 0u64..5_000), 0..40)) {
            let mut span = SustainedLoss::default();
            for &(lost, sent) in &windows {
                span.push(lost, sent);
            }
            let last = &windows[windows.len().saturating_sub(SUSTAINED_LOSS_WINDOWS)..];
            let lost: u64 = last.iter().map(|&(l, s)| capped_lost(l, s)).sum();
            let sent: u64 = last.iter().map(|&(_, s)| s).sum();
            prop_assert_eq!(span.span(), LossSpan { lost, sent, windows: u32::try_from(last.len()).unwrap_or(u32::MAX) });
            prop_assert!(span.span().pct() <= 100.0);
        }
    }
}
