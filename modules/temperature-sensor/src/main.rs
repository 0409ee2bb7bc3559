//! Sample edgeward module: a simulated temperature sensor.
//!
//! Prints one JSON reading per interval to stdout, signed by the module's
//! X509-SVID key and carrying a JWT-SVID for the telemetry audience:
//!
//! ```text
//! {"sensor":"s1","seq":1,"celsius":21.03,"ts_ms":1764374400000,"sig":"<hex DER>","token":"<JWT>"}
//! ```
//!
//! `sig` is ECDSA P-256 / SHA-256 over the line up to (not including)
//! `,"sig"` followed by `}`, i.e. the bare reading; it verifies with the
//! module's identity certificate (chained to `edgeward bundle`), which the
//! first reading and every reading after a renewal carry as `"cert"` (PEM
//! chain). `token` is re-fetched when it has less than a minute left.
//!
//! Settings (all optional), each read from the module's settings
//! (`wasi:config/store`, lower-case key) and, when that has none, from the
//! environment (upper-case):
//! - `sensor_id` / `SENSOR_ID`: the sensor's name in each reading (default
//!   `sensor-0`);
//! - `interval_ms` / `INTERVAL_MS`: milliseconds between readings (default
//!   1000, 1..=86_400_000);
//! - `count` / `COUNT`: readings to take before exiting successfully
//!   (default 0: forever);
//! - `token_audience` / `TOKEN_AUDIENCE`: the audience of the attached
//!   token (default `edgeward-telemetry`).

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgeward_sdk::identity;

struct Settings {
    sensor_id: String,
    interval: Duration,
    count: u64,
    audience: String,
}

/// Token lifetime requested; re-fetched with less than a minute left.
const TOKEN_TTL: Duration = Duration::from_secs(300);

/// The current token, fetched again when it is about to expire.
struct TokenCache {
    audience: String,
    token: Option<(String, u64)>,
    warned: bool,
}

impl TokenCache {
    fn get(&mut self, now_s: u64) -> Option<&str> {
        let fresh = self
            .token
            .as_ref()
            .is_some_and(|(_, exp)| *exp > now_s + 60);
        if !fresh {
            match identity::token(&[self.audience.as_str()], TOKEN_TTL) {
                Ok(t) => self.token = Some((t, now_s + TOKEN_TTL.as_secs())),
                Err(e) => {
                    if !self.warned {
                        eprintln!("temperature-sensor: no token: {e}");
                        self.warned = true;
                    }
                    self.token = None;
                }
            }
        }
        self.token.as_ref().map(|(t, _)| t.as_str())
    }
}

/// A signature over `data` and the certificate chain that verifies it. The
/// host may renew the certificate at any moment; a pair that straddles a
/// renewal is signed again.
fn signed(data: &[u8]) -> Result<(Vec<u8>, String), edgeward_sdk::Error> {
    let mut attempts = 0;
    loop {
        let before = identity::certificate()?.certificate_chain;
        let sig = identity::sign(data)?;
        let after = identity::certificate()?.certificate_chain;
        attempts += 1;
        if before == after || attempts == 3 {
            return Ok((sig, after));
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Setting `key` from the module's settings, else its upper-case name from
/// the environment; `None` if neither has it.
fn setting(key: &str) -> Result<Option<(String, String)>, String> {
    if let Some(v) = edgeward_sdk::settings::get(key).map_err(|e| format!("settings: {e}"))? {
        return Ok(Some((key.to_owned(), v)));
    }
    let name = key.to_ascii_uppercase();
    match std::env::var(&name) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name} is not valid UTF-8")),
        Ok(v) => Ok(Some((name, v))),
    }
}

fn number(key: &str, default: u64, range: std::ops::RangeInclusive<u64>) -> Result<u64, String> {
    let Some((name, raw)) = setting(key)? else {
        return Ok(default);
    };
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

fn text(key: &str, default: &str) -> Result<String, String> {
    Ok(setting(key)?.map_or_else(|| default.to_owned(), |(_, v)| v))
}

fn settings() -> Result<Settings, String> {
    Ok(Settings {
        sensor_id: text("sensor_id", "sensor-0")?,
        interval: Duration::from_millis(number("interval_ms", 1000, 1..=86_400_000)?),
        count: number("count", 0, 0..=u64::MAX)?,
        audience: text("token_audience", "edgeward-telemetry")?,
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
    let mut tokens = TokenCache {
        audience: settings.audience.clone(),
        token: None,
        warned: false,
    };
    let mut sign_warned = false;
    let mut last_cert = String::new();
    loop {
        seq += 1;
        // A bounded random walk around 21 °C.
        celsius += (noise.next_unit() - 0.5) * 0.4 + (21.0 - celsius) * 0.05;
        let reading = format!(
            "{{\"sensor\":\"{}\",\"seq\":{seq},\"celsius\":{celsius:.2},\"ts_ms\":{}}}",
            settings.sensor_id.escape_default(),
            now().as_millis()
        );
        let mut line = reading[..reading.len() - 1].to_owned();
        match signed(reading.as_bytes()) {
            Ok((sig, cert)) => {
                line.push_str(&format!(",\"sig\":\"{}\"", hex(&sig)));
                if cert != last_cert {
                    line.push_str(&format!(",\"cert\":\"{}\"", cert.replace('\n', "\\n")));
                    last_cert = cert;
                }
            }
            Err(e) if !sign_warned => {
                eprintln!("temperature-sensor: readings are unsigned: {e}");
                sign_warned = true;
            }
            Err(_) => {}
        }
        if let Some(t) = tokens.get(now().as_secs()) {
            line.push_str(&format!(",\"token\":\"{t}\""));
        }
        line.push('}');
        println!("{line}");
        if settings.count != 0 && seq >= settings.count {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(settings.interval);
    }
}
