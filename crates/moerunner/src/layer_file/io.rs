//! The input file (hidden states + exactly one routing source) and the output file of
//! `spec/layer-file.md`. Reading checks what the file alone can tell (names, dtypes, ranks, T);
//! [`InputFile::validate_against`] adds the layer's H, E and k, which `routing::resolve` and
//! `forward::hidden_as_f32` check again when the layer runs.

use std::collections::HashMap;
use std::path::Path;

use super::{write_tensors, MappedFile};
use crate::config::LayerConfig;
use crate::error::{MoeError, Result};
use crate::routing::{Routes, RoutingInput};
use crate::synth::SynthInput;
use crate::tensor::{DType, HostTensor};

/// The routing source of an input file.
#[derive(Clone, Debug)]
pub enum RoutingTensors {
    /// `router_logits` F32 or BF16 `[T, E]`: the layer routes.
    Logits(HostTensor),
    /// `topk_ids` I32 `[T, k]` + `topk_weights` F32 or BF16 `[T, k]`.
    TopK {
        ids: HostTensor,
        weights: HostTensor,
    },
    /// `topk_packed` I32 `[T, k]`.
    Packed(HostTensor),
}

/// An input file: hidden states `[T, H]` and exactly one routing source.
#[derive(Clone, Debug)]
pub struct InputFile {
    pub hidden: HostTensor,
    pub routing: RoutingTensors,
}

const INPUT_TENSORS: &[&str] = &[
    "hidden_states",
    "router_logits",
    "topk_ids",
    "topk_weights",
    "topk_packed",
];
const SOURCES: &str = "`router_logits`, `topk_ids` + `topk_weights`, or `topk_packed`";

/// Checks `t` is one of `dtypes` with shape `[tokens, _]`.
fn check_rows(
    name: &str,
    t: &HostTensor,
    dtypes: &[DType],
    tokens: usize,
    cols: &str,
) -> Result<()> {
    t.expect_dtype(name, dtypes)?;
    match t.shape[..] {
        [rows, _] if rows == tokens => Ok(()),
        _ => Err(MoeError::shape(
            name,
            format!("[{tokens}, {cols}] (T = {tokens} from `hidden_states`)"),
            &t.shape,
        )),
    }
}

/// Checks that the last dim of `t` is `want`.
fn check_cols(name: &str, t: &HostTensor, want: usize, what: &str) -> Result<()> {
    if t.shape.get(1) == Some(&want) {
        return Ok(());
    }
    Err(MoeError::shape(
        name,
        format!(
            "[{}, {want}] ({what})",
            t.shape.first().copied().unwrap_or(0)
        ),
        &t.shape,
    ))
}

impl InputFile {
    /// The routing source as the forward pass takes it.
    pub fn routing_input(&self) -> RoutingInput<'_> {
        match &self.routing {
            RoutingTensors::Logits(l) => RoutingInput::Logits(l),
            RoutingTensors::TopK { ids, weights } => RoutingInput::TopK { ids, weights },
            RoutingTensors::Packed(p) => RoutingInput::Packed(p),
        }
    }
    /// T.
    pub fn tokens(&self) -> usize {
        self.hidden.shape.first().copied().unwrap_or(0)
    }
    /// Checks names, dtypes, ranks and that every tensor has T rows (what the file alone says).
    pub fn validate_standalone(&self) -> Result<()> {
        let h = &self.hidden;
        h.expect_dtype("hidden_states", &[DType::BF16, DType::F16, DType::F32])?;
        if h.shape.len() != 2 {
            return Err(MoeError::shape("hidden_states", "[T, H]", &h.shape));
        }
        let t = self.tokens();
        match &self.routing {
            RoutingTensors::Logits(l) => {
                check_rows("router_logits", l, &[DType::F32, DType::BF16], t, "E")
            }
            RoutingTensors::TopK { ids, weights } => {
                check_rows("topk_ids", ids, &[DType::I32], t, "k")?;
                check_rows("topk_weights", weights, &[DType::F32, DType::BF16], t, "k")?;
                if ids.shape != weights.shape {
                    return Err(MoeError::shape(
                        "topk_weights",
                        format!("{:?} (the shape of `topk_ids`)", ids.shape),
                        &weights.shape,
                    ));
                }
                Ok(())
            }
            RoutingTensors::Packed(p) => check_rows("topk_packed", p, &[DType::I32], t, "k"),
        }
    }
    /// Checks H, E and k against the layer that will run this input, before it is loaded.
    pub fn validate_against(&self, config: &LayerConfig) -> Result<()> {
        self.validate_standalone()?;
        check_cols(
            "hidden_states",
            &self.hidden,
            config.hidden,
            "H of the layer",
        )?;
        let k = config.routing.top_k;
        match &self.routing {
            RoutingTensors::Logits(l) => {
                check_cols("router_logits", l, config.num_experts, "E of the layer")
            }
            RoutingTensors::TopK { ids, .. } => {
                check_cols("topk_ids", ids, k, "top_k of the layer")
            }
            RoutingTensors::Packed(p) => check_cols("topk_packed", p, k, "top_k of the layer"),
        }
    }
}

impl TryFrom<SynthInput> for InputFile {
    type Error = MoeError;
    fn try_from(s: SynthInput) -> Result<Self> {
        let routing = match (s.router_logits, s.topk_ids, s.topk_weights, s.topk_packed) {
            (Some(l), None, None, None) => RoutingTensors::Logits(l),
            (None, Some(ids), Some(weights), None) => RoutingTensors::TopK { ids, weights },
            (None, None, None, Some(p)) => RoutingTensors::Packed(p),
            _ => {
                return Err(MoeError::invalid(
                    "input",
                    format!("needs exactly one routing source: {SOURCES}"),
                ))
            }
        };
        Ok(InputFile {
            hidden: s.hidden,
            routing,
        })
    }
}

/// Reads an input file (memory-mapped) and checks it on its own
/// ([`InputFile::validate_standalone`]).
pub fn read_input(path: &Path) -> Result<InputFile> {
    let file = MappedFile::open(path)?;
    file.expect_only(INPUT_TENSORS, "an input file")?;
    let hidden = file.require("hidden_states")?;
    let present = [
        ("router_logits", file.has("router_logits")),
        (
            "topk_ids/topk_weights",
            file.has("topk_ids") || file.has("topk_weights"),
        ),
        ("topk_packed", file.has("topk_packed")),
    ];
    let found: Vec<&str> = present
        .iter()
        .filter(|(_, p)| *p)
        .map(|(n, _)| *n)
        .collect();
    if found.len() != 1 {
        let found = if found.is_empty() {
            "none".to_string()
        } else {
            found.join(", ")
        };
        return Err(MoeError::invalid(
            format!("input file {}", path.display()),
            format!("needs exactly one routing source: {SOURCES} (found: {found})"),
        ));
    }
    let routing = if let Some(l) = file.get("router_logits") {
        RoutingTensors::Logits(l)
    } else if let Some(p) = file.get("topk_packed") {
        RoutingTensors::Packed(p)
    } else {
        RoutingTensors::TopK {
            ids: file.require("topk_ids")?,
            weights: file.require("topk_weights")?,
        }
    };
    let input = InputFile { hidden, routing };
    input.validate_standalone()?;
    Ok(input)
}

/// Writes an input file atomically.
pub fn write_input(path: &Path, input: &InputFile) -> Result<()> {
    input.validate_standalone()?;
    let mut tensors = vec![("hidden_states".to_string(), input.hidden.clone())];
    match &input.routing {
        RoutingTensors::Logits(l) => tensors.push(("router_logits".into(), l.clone())),
        RoutingTensors::TopK { ids, weights } => {
            tensors.push(("topk_ids".into(), ids.clone()));
            tensors.push(("topk_weights".into(), weights.clone()));
        }
        RoutingTensors::Packed(p) => tensors.push(("topk_packed".into(), p.clone())),
    }
    write_tensors(path, &tensors, HashMap::new())
}

/// Writes an output file atomically: `output` `[T, H]` in the dtype of the hidden states, plus
/// `topk_ids` I32 and `topk_weights` F32 `[T, k]` when `routes` is given (`--save-routing`).
pub fn write_output(path: &Path, output: &HostTensor, routes: Option<&Routes>) -> Result<()> {
    let mut tensors = vec![("output".to_string(), output.clone())];
    if let Some(r) = routes {
        // write_tensors refuses ids/weights whose length disagrees with [T, k].
        tensors.push((
            "topk_ids".into(),
            HostTensor::from_i32(vec![r.tokens, r.top_k], &r.ids),
        ));
        tensors.push((
            "topk_weights".into(),
            HostTensor::from_f32(vec![r.tokens, r.top_k], &r.weights),
        ));
    }
    write_tensors(path, &tensors, HashMap::new())
}

/// Reads an output file (for tests and tools): `output` and, when the run saved them,
/// (`topk_ids`, `topk_weights`).
pub fn read_output(path: &Path) -> Result<(HostTensor, Option<(HostTensor, HostTensor)>)> {
    let file = MappedFile::open(path)?;
    file.expect_only(&["output", "topk_ids", "topk_weights"], "an output file")?;
    let routes = match (file.get("topk_ids"), file.get("topk_weights")) {
        (Some(ids), Some(weights)) => Some((ids, weights)),
        (None, None) => None,
        (Some(_), None) => {
            return Err(MoeError::missing(format!(
                "tensor `topk_weights` in {} (it has `topk_ids`)",
                path.display()
            )))
        }
        (None, Some(_)) => {
            return Err(MoeError::missing(format!(
                "tensor `topk_ids` in {} (it has `topk_weights`)",
                path.display()
            )))
        }
    };
    Ok((file.require("output")?, routes))
}
