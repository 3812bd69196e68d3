//! `loss.png`: the training loss (and evaluation loss, when there is one) and the learning
//! rate against the step, drawn at the end of a run from `logging.jsonl`'s records.

use std::path::Path;

use crate::{Error, Result};

/// One point of the curves.
#[derive(Debug, Clone, Copy)]
pub struct Point {
    pub step: usize,
    pub loss: f64,
    pub learning_rate: f64,
}

/// Draws the loss (left) and learning-rate (right) panels into `path`.
pub fn draw_loss_curves(path: &Path, train: &[Point], eval: &[(usize, f64)]) -> Result<()> {
    use plotters::prelude::*;
    let plot_error =
        |e: &dyn std::fmt::Display| Error::State(format!("drawing {}: {e}", path.display()));
    if !oxtune_data::stats::ensure_font() {
        return Err(plot_error(&"the bundled font did not load"));
    }
    let finite: Vec<&Point> = train.iter().filter(|p| p.loss.is_finite()).collect();
    let last_step = train.iter().map(|p| p.step).max().unwrap_or(1).max(1);
    let (low, high) = finite
        .iter()
        .map(|p| p.loss)
        .chain(eval.iter().map(|e| e.1).filter(|l| l.is_finite()))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), l| {
            (lo.min(l), hi.max(l))
        });
    let (low, high) = if low.is_finite() {
        (low, high.max(low + 1e-6))
    } else {
        (0.0, 1.0)
    };
    let margin = (high - low) * 0.05;
    let max_lr = train
        .iter()
        .map(|p| p.learning_rate)
        .fold(0.0, f64::max)
        .max(1e-12);

    let root = BitMapBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(&e))?;
    let (left, right) = root.split_horizontally(720);
    let mut chart = ChartBuilder::on(&left)
        .caption("loss", ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0..last_step, (low - margin)..(high + margin))
        .map_err(|e| plot_error(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| plot_error(&e))?;
    let blue = RGBColor(9, 105, 218);
    chart
        .draw_series(LineSeries::new(
            finite.iter().map(|p| (p.step, p.loss)),
            blue.stroke_width(2),
        ))
        .map_err(|e| plot_error(&e))?
        .label("train")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], blue.stroke_width(2)));
    if !eval.is_empty() {
        chart
            .draw_series(LineSeries::new(eval.iter().copied(), RED.stroke_width(2)))
            .map_err(|e| plot_error(&e))?
            .label("eval")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED.stroke_width(2)));
        chart
            .draw_series(
                eval.iter()
                    .map(|&(step, loss)| Circle::new((step, loss), 3, RED.filled())),
            )
            .map_err(|e| plot_error(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(|e| plot_error(&e))?;
    let mut lr_chart = ChartBuilder::on(&right)
        .caption("learning rate", ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(72)
        .build_cartesian_2d(0..last_step, 0.0..max_lr * 1.05)
        .map_err(|e| plot_error(&e))?;
    lr_chart
        .configure_mesh()
        .x_desc("step")
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| plot_error(&e))?;
    lr_chart
        .draw_series(LineSeries::new(
            train.iter().map(|p| (p.step, p.learning_rate)),
            RGBColor(26, 127, 55).stroke_width(2),
        ))
        .map_err(|e| plot_error(&e))?;
    root.present().map_err(|e| plot_error(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("loss.png");
        #[expect(clippy::cast_precision_loss, reason = "small steps")]
        let points: Vec<Point> = (1..=20)
            .map(|s| Point {
                step: s,
                loss: 3.0 / s as f64,
                learning_rate: 1e-4 * s as f64 / 20.0,
            })
            .collect();
        draw_loss_curves(&path, &points, &[(10, 0.5), (20, 0.3)])?;
        let bytes = std::fs::read(&path)?;
        assert_eq!(&bytes[1..4], b"PNG");
        Ok(())
    }
}
