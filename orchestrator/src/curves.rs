//! `curves.png`: reward mean, format rate (train and eval), eval accuracy and KL against the
//! iteration, redrawn after every iteration (plotters, pure Rust). Text needs a TrueType font:
//! the first of `CURVES_FONT` and the usual DejaVu/Liberation paths; without one the panels are
//! drawn without labels (and the log says so) rather than not at all.

use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers a font once; whether text can be drawn.
fn have_font() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        let candidates = std::env::var("CURVES_FONT")
            .into_iter()
            .chain(FONT_PATHS.iter().map(|s| s.to_string()));
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        tracing::warn!(
            "no TrueType font found (set CURVES_FONT=path.ttf); curves.png is drawn without labels"
        );
        false
    })
}

/// One curve: a name and its points.
pub struct Series {
    pub name: &'static str,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
}

/// One panel: its title, its curves, and what it says while they have no point yet.
pub struct Panel {
    pub title: &'static str,
    pub series: Vec<Series>,
    pub empty: &'static str,
}

/// The picture's size in pixels.
const SIZE: (u32, u32) = (1200, 800);

/// Draws the panels (title, series) side by side in a grid; returns the PNG's bytes (written by
/// the caller through [`rl_core::files`], so that a full disk is reported like any other write).
pub fn draw(panels: &[Panel]) -> anyhow::Result<Vec<u8>> {
    let mut pixels = vec![0u8; SIZE.0 as usize * SIZE.1 as usize * 3];
    draw_into(panels, &mut pixels)?;
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        // Best compression: a mostly white chart shrinks ~8x (573 to 69 kB; READMEs show it).
        image::codecs::png::PngEncoder::new_with_quality(
            &mut png,
            image::codecs::png::CompressionType::Best,
            image::codecs::png::FilterType::Adaptive,
        ),
        &pixels,
        SIZE.0,
        SIZE.1,
        image::ColorType::Rgb8,
    )?;
    Ok(png)
}

/// Draws into an RGB buffer of [`SIZE`].
fn draw_into(panels: &[Panel], pixels: &mut [u8]) -> anyhow::Result<()> {
    let text = have_font();
    let root = BitMapBackend::with_buffer(pixels, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cols = 2;
    let rows = panels.len().div_ceil(cols).max(1);
    let areas = root.split_evenly((rows, cols));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        let series = &panel.series;
        let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
        let ys: Vec<f64> = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .collect();
        let x_max = xs.fold(1.0f64, f64::max);
        let (mut y_min, mut y_max) = ys
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &y| {
                (a.min(y), b.max(y))
            });
        if !y_min.is_finite() {
            (y_min, y_max) = (0.0, 1.0);
        }
        if y_max - y_min < 1e-9 {
            // A flat line: at 0 it is a rate or an accuracy that has not moved yet.
            (y_min, y_max) = if y_min == 0.0 {
                (0.0, 1.0)
            } else {
                (y_min - 0.5, y_max + 0.5)
            };
        }
        let pad = (y_max - y_min) * 0.05;
        let mut builder = ChartBuilder::on(area);
        builder.margin(12);
        if text {
            builder
                .caption(panel.title, ("sans-serif", 20))
                .x_label_area_size(30)
                .y_label_area_size(50);
        }
        let mut chart = builder
            .build_cartesian_2d(0f64..x_max, (y_min - pad)..(y_max + pad))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut mesh = chart.configure_mesh();
        // Iterations are whole: one tick each (fewer past 20), no fractions.
        mesh.x_desc("iteration")
            .x_labels((x_max as usize + 1).min(21))
            .x_label_formatter(&tick_label)
            .y_label_formatter(&value_label);
        if !text {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().map_err(|e| anyhow::anyhow!("{e}"))?;
        if text && ys.is_empty() {
            let at = (x_max / 2.0, (y_min + y_max) / 2.0);
            chart
                .plotting_area()
                .draw(&Text::new(
                    panel.empty,
                    at,
                    TextStyle::from(("sans-serif", 18).into_font())
                        .pos(Pos::new(HPos::Center, VPos::Center)),
                ))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        for s in series {
            let color = s.color;
            let drawn = chart
                .draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if text {
                drawn
                    .label(s.name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            }
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        if text && series.len() > 1 {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// The label of an iteration tick: the whole number, nothing between two.
fn tick_label(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{}", x.round() as i64)
    } else {
        String::new()
    }
}

/// The label of a value tick: its shortest decimal form (plotters' own prints "-0.0" for a tick
/// a rounding error below zero).
fn value_label(y: &f64) -> String {
    let text = format!("{y:.6}");
    // The integer digits keep at least one digit: "0.000000" trims to "0", "-0.000000" to "-0".
    match text.trim_end_matches('0').trim_end_matches('.') {
        "-0" => "0".to_string(),
        t => t.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iteration_ticks_are_whole_and_an_empty_panel_still_draws() {
        assert_eq!(tick_label(&3.0), "3");
        assert_eq!(tick_label(&0.0), "0");
        assert_eq!(tick_label(&2.5), "");
        assert_eq!(value_label(&-1e-17), "0");
        assert_eq!(value_label(&-0.7999999999999999), "-0.8");
        assert_eq!(value_label(&0.025), "0.025");
        assert_eq!(value_label(&1.0), "1");
        let panels = [
            Panel {
                title: "reward",
                series: vec![Series {
                    name: "reward",
                    points: vec![(0.0, -0.9), (1.0, -0.5)],
                    color: BLUE,
                }],
                empty: "no iteration has finished yet",
            },
            Panel {
                title: "eval accuracy",
                series: vec![Series {
                    name: "accuracy",
                    points: vec![],
                    color: RED,
                }],
                empty: "no evaluation has run yet",
            },
        ];
        let png = draw(&panels).expect("draws");
        assert!(png.starts_with(b"\x89PNG"));
        let img = image::load_from_memory(&png).expect("a PNG");
        assert_eq!((img.width(), img.height()), SIZE);
    }
}
