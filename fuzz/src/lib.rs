//! Helpers shared by the fuzz targets.

use serde_json::Value;

/// JSON equality, except that floats may differ in the last bit: serde_json (without its
/// `float_roundtrip` feature, which the project does not enable) may parse the shortest
/// representation it printed one ULP off. Everything else must be equal.
pub fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() && y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => x == y || x.to_bits().abs_diff(y.to_bits()) <= 1,
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_json(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}
