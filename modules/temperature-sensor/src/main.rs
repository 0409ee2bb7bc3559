//! Sample edgeward module: a simulated temperature sensor.
//!
//! Prints one JSON reading per interval to stdout.
//!
//! Environment (all optional):
//! - `SENSOR_ID`: the sensor's name in each reading (default `sensor-0`);
//! - `INTERVAL_MS`: milliseconds between readings (default 1000, 1..=86_400_000);
//! - `COUNT`: readings to take before exiting successfully (default 0: forever).

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

struct Settings {
    sensor_id: String,
    interval: Duration,
    count: u64,
}

fn env_number(
    name: &str,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, String> {
    match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => Ok(default),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name} is not valid UTF-8")),
        Ok(raw) => {
            let value: u64 = raw
                .trim()
                .parse()
                .map_err(|_| format!("{name}={raw:?} is not a whole number"))?;
            if range.contains(&value) {
                Ok(value)
            } else {
                Err(format!(
                    "{name}={value} is out of range {}..={}",
                    range.start(),
                    range.end()
                ))
            }
        }
    }
}

fn settings() -> Result<Settings, String> {
    Ok(Settings {
        sensor_id: std::env::var("SENSOR_ID").unwrap_or_else(|_| "sensor-0".to_owned()),
        interval: Duration::from_millis(env_number("INTERVAL_MS", 1000, 1..=86_400_000)?),
        count: env_number("COUNT", 0, 0..=u64::MAX)?,
    })
}

/// A small xorshift generator: the sensor's noise, not anything secret.
struct Noise(u64);

impl Noise {
    fn next_unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn main() -> ExitCode {
    let settings = match settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("temperature-sensor: {e}");
            return ExitCode::FAILURE;
        }
    };
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    };
    // Seeded from the clock and the sensor's name, so sensors started in the
    // same millisecond still read differently.
    let name_seed = settings
        .sensor_id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let mut noise = Noise((now().as_nanos() as u64 ^ name_seed) | 1);
    let mut celsius = 21.0_f64;
    let mut seq = 0u64;
    loop {
        seq += 1;
        // A bounded random walk around 21 °C.
        celsius += (noise.next_unit() - 0.5) * 0.4 + (21.0 - celsius) * 0.05;
        println!(
            "{{\"sensor\":\"{}\",\"seq\":{seq},\"celsius\":{celsius:.2},\"ts_ms\":{}}}",
            settings.sensor_id,
            now().as_millis()
        );
        if settings.count != 0 && seq >= settings.count {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(settings.interval);
    }
}
