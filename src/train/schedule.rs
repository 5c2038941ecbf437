//! Learning-rate schedules with linear warmup, matching Hugging Face transformers'
//! `get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup` and
//! `get_cosine_schedule_with_warmup` (num_cycles = 0.5).
use crate::error::{OctetError, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How the learning rate decays after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Stay at the peak.
    Constant,
    /// Straight line from the peak down to the floor at `total`.
    Linear,
    /// Half a cosine from the peak down to the floor at `total`.
    Cosine,
}

impl FromStr for ScheduleKind {
    type Err = OctetError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "constant" => Ok(Self::Constant),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            _ => Err(OctetError::InvalidArgument(format!(
                "unknown learning-rate schedule {s:?}: expected one of constant, linear, cosine"
            ))),
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Constant => "constant",
            Self::Linear => "linear",
            Self::Cosine => "cosine",
        })
    }
}

/// A learning rate per 0-based optimizer step.
///
/// During warmup (`step < warmup`) the rate is `peak * step / warmup` — so step 0 runs at 0, as in
/// transformers. Afterwards `Linear`/`Cosine` decay over `total - warmup` steps to
/// `peak * min_ratio`, reached at `step == total` and held beyond it (transformers' cosine would
/// rise again past `total`; clamping is the useful behaviour for over-long runs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Learning rate at the end of warmup.
    pub peak: f64,
    /// Number of warmup steps.
    pub warmup: usize,
    /// Total number of optimizer steps of the run.
    pub total: usize,
    /// Decay shape after warmup.
    pub kind: ScheduleKind,
    /// Floor as a fraction of `peak` (0 = decay to zero, as transformers does).
    #[serde(default)]
    pub min_ratio: f64,
}

impl LrSchedule {
    /// A schedule decaying to zero. Errors on a negative or non-finite `peak`, or
    /// `warmup > total`.
    pub fn new(kind: ScheduleKind, peak: f64, warmup: usize, total: usize) -> Result<Self> {
        if !peak.is_finite() || peak < 0.0 {
            return Err(OctetError::InvalidArgument(format!(
                "learning rate must be a finite number ≥ 0, got {peak}"
            )));
        }
        if warmup > total {
            return Err(OctetError::InvalidArgument(format!(
                "warmup steps ({warmup}) exceed the total number of steps ({total})"
            )));
        }
        Ok(Self {
            peak,
            warmup,
            total,
            kind,
            min_ratio: 0.0,
        })
    }

    /// The same schedule decaying to `peak * min_ratio` instead of zero (`min_ratio` in [0, 1]).
    pub fn with_min_ratio(mut self, min_ratio: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&min_ratio) {
            return Err(OctetError::InvalidArgument(format!(
                "minimum learning-rate ratio must be in [0, 1], got {min_ratio}"
            )));
        }
        self.min_ratio = min_ratio;
        Ok(self)
    }

    /// Learning rate for the 0-based optimizer step `step`.
    pub fn lr(&self, step: usize) -> f64 {
        self.peak * self.factor(step)
    }

    /// The multiplier on `peak` (transformers' `lr_lambda`).
    pub fn factor(&self, step: usize) -> f64 {
        if step < self.warmup {
            return step as f64 / self.warmup.max(1) as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let decayed = match self.kind {
            ScheduleKind::Constant => return 1.0,
            // Written as transformers writes it, so `warmup == total` also gives 0 at the end.
            ScheduleKind::Linear => (self.total as f64 - step as f64) / span,
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        // transformers' cosine-with-min-lr form: factor * (1 - min) + min.
        decayed.max(0.0) * (1.0 - self.min_ratio) + self.min_ratio
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    // transformers' lr_lambda functions, transcribed literally.
    fn hf_warm(s: usize, w: usize) -> Option<f64> {
        (s < w).then(|| s as f64 / (w.max(1)) as f64)
    }
    fn hf_linear(s: usize, w: usize, t: usize) -> f64 {
        hf_warm(s, w).unwrap_or_else(|| (0f64).max((t as f64 - s as f64) / ((t - w).max(1)) as f64))
    }
    fn hf_cosine(s: usize, w: usize, t: usize) -> f64 {
        hf_warm(s, w).unwrap_or_else(|| {
            let progress = (s - w) as f64 / ((t - w).max(1)) as f64;
            (0f64).max(0.5 * (1.0 + (PI * 0.5 * 2.0 * progress).cos()))
        })
    }

    #[test]
    fn matches_transformers() {
        let (peak, w, t) = (3e-4, 10, 100);
        let lin = LrSchedule::new(ScheduleKind::Linear, peak, w, t).unwrap();
        let cos = LrSchedule::new(ScheduleKind::Cosine, peak, w, t).unwrap();
        let con = LrSchedule::new(ScheduleKind::Constant, peak, w, t).unwrap();
        for s in [0, 1, 5, 9, 10, 11, 37, 55, 99, 100] {
            assert!(
                close(lin.lr(s), peak * hf_linear(s, w, t)),
                "linear step {s}"
            );
            assert!(
                close(cos.lr(s), peak * hf_cosine(s, w, t)),
                "cosine step {s}"
            );
            let hf_const = hf_warm(s, w).unwrap_or(1.0);
            assert!(close(con.lr(s), peak * hf_const), "constant step {s}");
        }
        // Hand-checked anchors: half-way through warmup, top of warmup, middle of decay.
        assert!(close(lin.lr(5), peak * 5.0 / 10.0));
        assert!(close(cos.lr(10), peak));
        assert!(close(
            cos.lr(55),
            peak * 0.5 * (1.0 + (PI * 45.0 / 90.0).cos())
        ));
        assert!(close(lin.lr(55), peak * (100.0 - 55.0) / 90.0));
        assert_eq!(lin.lr(100), 0.0);
    }

    #[test]
    fn no_warmup_and_clamping() {
        let cos = LrSchedule::new(ScheduleKind::Cosine, 1.0, 0, 4).unwrap();
        assert!(close(cos.lr(0), 1.0));
        assert!(close(cos.lr(1), hf_cosine(1, 0, 4)));
        // Past the end transformers' cosine would climb again; octet holds the floor.
        assert!(close(cos.lr(6), 0.0));
        let lin = LrSchedule::new(ScheduleKind::Linear, 1.0, 0, 4).unwrap();
        assert!(close(lin.lr(9), 0.0));
        // Degenerate warmup == total: transformers' linear is 0 there, its cosine 1.
        let lin = LrSchedule::new(ScheduleKind::Linear, 1.0, 3, 3).unwrap();
        assert!(close(lin.lr(3), hf_linear(3, 3, 3)));
        let cos = LrSchedule::new(ScheduleKind::Cosine, 1.0, 3, 3).unwrap();
        assert!(close(cos.lr(3), hf_cosine(3, 3, 3)));
    }

    #[test]
    fn min_ratio_floor() {
        let (peak, w, t, m) = (1e-3, 2, 12, 0.1);
        let cos = LrSchedule::new(ScheduleKind::Cosine, peak, w, t)
            .unwrap()
            .with_min_ratio(m)
            .unwrap();
        for s in [2, 5, 12, 20] {
            let f = hf_cosine(s.min(t), w, t);
            assert!(close(cos.lr(s), peak * (f * (1.0 - m) + m)), "step {s}");
        }
        assert!(close(cos.lr(1), peak * 0.5), "warmup ignores the floor");
    }

    #[test]
    fn parsing_and_validation() {
        assert_eq!(
            "Cosine".parse::<ScheduleKind>().unwrap(),
            ScheduleKind::Cosine
        );
        assert_eq!(
            "linear".parse::<ScheduleKind>().unwrap(),
            ScheduleKind::Linear
        );
        let err = "exp".parse::<ScheduleKind>().unwrap_err().to_string();
        assert!(err.contains("\"exp\"") && err.contains("cosine"), "{err}");
        assert!(LrSchedule::new(ScheduleKind::Linear, 1.0, 5, 4).is_err());
        assert!(LrSchedule::new(ScheduleKind::Linear, f64::NAN, 0, 4).is_err());
        let s = LrSchedule::new(ScheduleKind::Linear, 1.0, 0, 4).unwrap();
        assert!(s.with_min_ratio(1.5).is_err());
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"linear\""), "{json}");
        assert_eq!(serde_json::from_str::<LrSchedule>(&json).unwrap(), s);
    }
}
