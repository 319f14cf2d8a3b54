//! Where a model runs, parsed once from the config (`model.device`, `services.rollout.devices`):
//! the CPU or a CUDA device by index. Everything downstream compares this enum, never a string;
//! it goes back to a string only on a child's command line (`--device`), in the same spelling.

use serde::{Deserialize, Serialize};

/// The CPU, or CUDA device `N` (`cuda` alone is `cuda:0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Device {
    Cpu,
    Cuda(u32),
}

impl Device {
    pub fn is_cpu(self) -> bool {
        self == Device::Cpu
    }
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let fix = "use cpu, cuda or cuda:N";
        match s {
            "" => Err(format!("is empty; {fix}")),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device; {fix}")),
        }
    }
}

impl TryFrom<String> for Device {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Device> for String {
    fn from(d: Device) -> String {
        d.to_string()
    }
}

impl std::fmt::Display for Device {
    /// The spelling the services' `--device` flag takes (`cpu`, `cuda:N`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Device;

    #[test]
    fn devices_parse_once_and_print_back() {
        for (text, device, shown) in [
            ("cpu", Device::Cpu, "cpu"),
            ("cuda", Device::Cuda(0), "cuda:0"),
            ("cuda:3", Device::Cuda(3), "cuda:3"),
        ] {
            let d: Device = text.parse().unwrap();
            assert_eq!((d, d.to_string().as_str()), (device, shown));
            assert_eq!(shown.parse::<Device>(), Ok(device));
        }
        for bad in [
            "gpu",
            "cuda:",
            "cuda:x",
            "CPU",
            "cuda:-1",
            "cuda:99999999999",
        ] {
            let e = bad.parse::<Device>().unwrap_err();
            assert!(e.contains(&format!("`{bad}` is not a device")), "{e}");
        }
        assert!("".parse::<Device>().unwrap_err().starts_with("is empty"));
    }
}
