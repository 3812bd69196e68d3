//! Learning-rate schedules, as transformers' `get_scheduler` defines them: the factor
//! applied to the peak learning rate at optimizer step `step` (0-based) of `total_steps`.

/// `lr_scheduler_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    Linear,
    Cosine,
    Constant,
    ConstantWithWarmup,
}

impl std::str::FromStr for ScheduleKind {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            "constant" => Ok(Self::Constant),
            "constant_with_warmup" => Ok(Self::ConstantWithWarmup),
            other => Err(format!(
                "unknown lr_scheduler_type `{other}`; expected linear, cosine, constant or constant_with_warmup"
            )),
        }
    }
}

/// A schedule over a run of `total_steps` optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak_learning_rate: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// `warmup_steps = ceil(warmup_ratio * total_steps)`, as transformers computes it.
    pub fn new(
        kind: ScheduleKind,
        peak_learning_rate: f64,
        warmup_ratio: f64,
        total_steps: usize,
    ) -> Self {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "step counts"
        )]
        let warmup_steps = (warmup_ratio * total_steps as f64).ceil() as usize;
        Self {
            kind,
            peak_learning_rate,
            warmup_steps,
            total_steps,
        }
    }

    /// The learning rate of optimizer step `step` (0-based).
    #[expect(clippy::cast_precision_loss, reason = "step counts")]
    pub fn learning_rate(&self, step: usize) -> f64 {
        let (step_f, warmup, total) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        let factor = if self.kind != ScheduleKind::Constant && step < self.warmup_steps {
            step_f / warmup.max(1.0)
        } else {
            let progress = (step_f - warmup) / (total - warmup).max(1.0);
            match self.kind {
                ScheduleKind::Linear => ((total - step_f) / (total - warmup).max(1.0)).max(0.0),
                ScheduleKind::Cosine => {
                    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
                }
                ScheduleKind::Constant | ScheduleKind::ConstantWithWarmup => 1.0,
            }
        };
        self.peak_learning_rate * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_like_transformers() {
        let linear = Schedule::new(ScheduleKind::Linear, 1.0, 0.1, 10);
        assert_eq!(linear.warmup_steps, 1);
        let rates: Vec<f64> = (0..10).map(|s| linear.learning_rate(s)).collect();
        assert_eq!(rates[0], 0.0);
        assert!((rates[1] - 1.0).abs() < 1e-12);
        assert!((rates[5] - 5.0 / 9.0).abs() < 1e-12);
        let cosine = Schedule::new(ScheduleKind::Cosine, 2.0, 0.0, 4);
        assert!((cosine.learning_rate(0) - 2.0).abs() < 1e-12);
        assert!((cosine.learning_rate(2) - 1.0).abs() < 1e-12);
        let constant = Schedule::new(ScheduleKind::Constant, 3.0, 0.5, 4);
        assert_eq!(constant.learning_rate(0), 3.0);
        let warm = Schedule::new(ScheduleKind::ConstantWithWarmup, 3.0, 0.5, 4);
        assert_eq!(warm.learning_rate(1), 1.5);
        assert_eq!(warm.learning_rate(3), 3.0);
    }
}
