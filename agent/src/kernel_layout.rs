//! Kernel struct member offsets from BTF (`/sys/kernel/btf/vmlinux`).
//!
//! rustc emits no CO-RE relocations for BPF, so instead of letting the loader relocate field
//! accesses we resolve the few offsets the programs need here and pass them in as globals.

use std::path::Path;

use btf_rs::{Btf, Type};
use graywatch_common::KernelOffsets;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "cannot read kernel BTF at {path}: {source}. graywatch needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (EKS AL2023 and most distribution kernels are)"
    )]
    Unreadable {
        path: String,
        #[source]
        source: btf_rs::Error,
    },
    #[error("kernel BTF has no struct `{0}`")]
    NoStruct(String),
    #[error("kernel BTF: struct `{structure}` has no member `{member}` (looked for {path})")]
    NoMember {
        structure: String,
        member: String,
        path: String,
    },
    #[error("kernel BTF: `{path}` is a bitfield, which the programs cannot read")]
    Bitfield { path: String },
    #[error("kernel BTF lookup failed for {path}: {source}")]
    Btf {
        path: String,
        #[source]
        source: btf_rs::Error,
    },
}

/// Parsed kernel BTF, queried by dotted member paths such as `sock.__sk_common.skc_daddr`.
pub struct KernelLayout {
    btf: Btf,
}

impl KernelLayout {
    pub fn from_file(path: &Path) -> Result<Self, LayoutError> {
        let btf = Btf::from_file(path).map_err(|source| LayoutError::Unreadable {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self { btf })
    }

    /// Byte offset of `path` (`struct.member.member…`), descending through anonymous structs
    /// and unions the way C field access does.
    pub fn offset_of(&self, path: &str) -> Result<u32, LayoutError> {
        let mut parts = path.split('.');
        let root = parts.next().unwrap_or_default();
        let mut current = self.find_struct(root)?;
        let mut structure = root.to_owned();
        let mut offset_bits = 0u32;
        let mut members = parts.peekable();
        while let Some(member) = members.next() {
            let (bits, ty) = self
                .find_member(&current, member, path)?
                .ok_or_else(|| LayoutError::NoMember {
                    structure: structure.clone(),
                    member: member.to_owned(),
                    path: path.to_owned(),
                })?;
            offset_bits += bits;
            if members.peek().is_some() {
                current = self.as_struct(ty, path)?.ok_or_else(|| LayoutError::NoMember {
                    structure: member.to_owned(),
                    member: members.peek().copied().unwrap_or_default().to_owned(),
                    path: path.to_owned(),
                })?;
                member.clone_into(&mut structure);
            }
        }
        if !offset_bits.is_multiple_of(8) {
            return Err(LayoutError::Bitfield { path: path.to_owned() });
        }
        Ok(offset_bits / 8)
    }

    /// Every offset the network programs need.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, LayoutError> {
        Ok(KernelOffsets {
            sock_family: self.offset_of("sock.__sk_common.skc_family")?,
            sock_daddr: self.offset_of("sock.__sk_common.skc_daddr")?,
            sock_v6_daddr: self.offset_of("sock.__sk_common.skc_v6_daddr")?,
            sock_cgroup: self.offset_of("sock.sk_cgrp_data.cgroup")?,
            cgroup_kn: self.offset_of("cgroup.kn")?,
            kernfs_node_id: self.offset_of("kernfs_node.id")?,
            tcp_sock_data_segs_out: self.offset_of("tcp_sock.data_segs_out")?,
            skb_sk: self.offset_of("sk_buff.sk")?,
            skb_head: self.offset_of("sk_buff.head")?,
            skb_network_header: self.offset_of("sk_buff.network_header")?,
            skb_tcp_gso_segs: self.offset_of("sk_buff.cb")? + self.offset_of("tcp_skb_cb.tcp_gso_segs")?,
            sock_cookie: self.offset_of("sock.__sk_common.skc_cookie")?,
            tcp_sock_srtt_us: self.offset_of("tcp_sock.srtt_us")?,
            sock_dport: self.offset_of("sock.__sk_common.skc_dport")?,
            sock_num: self.offset_of("sock.__sk_common.skc_num")?,
            sock_state: self.offset_of("sock.__sk_common.skc_state")?,
            sock_err: self.offset_of("sock.sk_err")?,
            skb_protocol: self.offset_of("sk_buff.protocol")?,
        })
    }

    fn btf_err(path: &str) -> impl FnOnce(btf_rs::Error) -> LayoutError + '_ {
        move |source| LayoutError::Btf {
            path: path.to_owned(),
            source,
        }
    }

    fn find_struct(&self, name: &str) -> Result<btf_rs::Struct, LayoutError> {
        let types = self.btf.resolve_types_by_name(name).map_err(Self::btf_err(name))?;
        types
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) => Some(s),
                _ => None,
            })
            .ok_or_else(|| LayoutError::NoStruct(name.to_owned()))
    }

    /// The bit offset and type of member `name` in `s`, searching anonymous members recursively.
    fn find_member(&self, s: &btf_rs::Struct, name: &str, path: &str) -> Result<Option<(u32, Type)>, LayoutError> {
        for member in &s.members {
            let member_name = self.btf.resolve_name(member).map_err(Self::btf_err(path))?;
            let ty = self.btf.resolve_chained_type(member).map_err(Self::btf_err(path))?;
            if member_name == name {
                if member.bitfield_size().is_some_and(|size| size != 0) {
                    return Err(LayoutError::Bitfield { path: path.to_owned() });
                }
                return Ok(Some((member.bit_offset(), ty)));
            }
            if member_name.is_empty()
                && let Some(inner) = self.as_struct(ty, path)?
                && let Some((bits, found)) = self.find_member(&inner, name, path)?
            {
                return Ok(Some((member.bit_offset() + bits, found)));
            }
        }
        Ok(None)
    }

    /// Follows typedefs and qualifiers to a struct or union, if `ty` is one.
    fn as_struct(&self, mut ty: Type, path: &str) -> Result<Option<btf_rs::Struct>, LayoutError> {
        loop {
            ty = match ty {
                Type::Struct(s) | Type::Union(s) => return Ok(Some(s)),
                Type::Typedef(t) => self.btf.resolve_chained_type(&t).map_err(Self::btf_err(path))?,
                Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => {
                    self.btf.resolve_chained_type(&t).map_err(Self::btf_err(path))?
                }
                Type::TypeTag(t) => self.btf.resolve_chained_type(&t).map_err(Self::btf_err(path))?,
                _ => return Ok(None),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

    #[test]
    fn resolves_the_network_offsets_on_this_kernel() {
        assert!(
            Path::new(VMLINUX).exists(),
            "{VMLINUX} is missing: graywatch's supported kernels all have BTF"
        );
        let layout = KernelLayout::from_file(Path::new(VMLINUX)).expect("parse vmlinux BTF");
        let offsets = layout.kernel_offsets().expect("all offsets resolve");
        // skc_family sits in the first cache line of struct sock_common on every kernel.
        assert!(offsets.sock_family < 64, "{offsets:?}");
        assert!(offsets.sock_state < 64, "{offsets:?}");
        assert_ne!(offsets.sock_cgroup, 0);
        assert!(
            offsets.tcp_sock_data_segs_out > offsets.sock_cgroup,
            "tcp_sock embeds sock first"
        );
        assert!(matches!(
            layout.offset_of("sock.no_such_member"),
            Err(LayoutError::NoMember { .. })
        ));
        assert!(matches!(
            layout.offset_of("no_such_struct.x"),
            Err(LayoutError::NoStruct(_))
        ));
    }
}
