//! The man pages, made from the same sources as the CLI and the configuration reference:
//! `vmsnap(8)`, one `vmsnap-COMMAND(8)` per subcommand, and `vmsnap.toml(5)` from
//! `dist/vmsnap.toml.example`.

use crate::Cli;
use clap::CommandFactory;

/// The configuration reference the `vmsnap.toml(5)` page holds.
const REFERENCE: &str = include_str!("../../dist/vmsnap.toml.example");

/// Every page: (file name, e.g. `vmsnap-snapshot.8`, roff text).
pub fn pages() -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let top = Cli::command().name("vmsnap");
    let mut out = Vec::new();
    let mut page = Vec::new();
    clap_mangen::Man::new(top.clone()).section("8").render(&mut page)?;
    out.push(("vmsnap.8".to_owned(), page));
    for sub in top.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("vmsnap-{}", sub.get_name());
        let mut page = Vec::new();
        clap_mangen::Man::new(sub.clone().name(name.clone()).bin_name(format!("vmsnap {}", sub.get_name())))
            .section("8")
            .render(&mut page)?;
        out.push((format!("{name}.8"), page));
    }
    out.push(("vmsnap.toml.5".to_owned(), config_page().into_bytes()));
    Ok(out)
}

/// `vmsnap.toml(5)`: the reference file, commented as it is.
fn config_page() -> String {
    let body: String = REFERENCE
        .lines()
        .map(|l| {
            // roff: a backslash is escaped, a line starting with '.' or '\'' would be a request.
            let l = l.replace('\\', "\\e");
            if l.starts_with('.') || l.starts_with('\'') {
                format!("\\&{l}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    format!(
        ".TH VMSNAP.TOML 5 \"\" \"vmsnap {}\"\n.SH NAME\nvmsnap.toml \\- vmsnap's configuration file\n.SH DESCRIPTION\n\
         vmsnap reads /etc/vmsnap/vmsnap.toml (vmsnap \\-\\-config FILE for another). Below is every key it accepts,\n\
         with its default and its meaning; the file loads as it is. An unknown key, a relative path or a value out of\n\
         range is refused with the file, the line and the key named.\n.SH REFERENCE\n.nf\n{body}.fi\n.SH SEE ALSO\nvmsnap(8)\n",
        env!("CARGO_PKG_VERSION")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What roff makes of a flag: `-` is written `\-`.
    fn in_page(page: &str, flag: &str) -> bool {
        page.contains(&flag.replace('-', "\\-"))
    }

    #[test]
    fn every_subcommand_has_a_page_with_every_flag_of_its_help() {
        let pages = pages().unwrap();
        let top = Cli::command();
        for sub in top.get_subcommands().filter(|s| !s.is_hide_set()) {
            let file = format!("vmsnap-{}.8", sub.get_name());
            let page = pages.iter().find(|(n, _)| *n == file).map(|(_, p)| String::from_utf8_lossy(p).into_owned());
            let page = page.unwrap_or_else(|| panic!("no page {file}"));
            for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
                if let Some(long) = arg.get_long() {
                    assert!(in_page(&page, &format!("--{long}")), "{file} lacks --{long}");
                }
            }
        }
        let main = String::from_utf8_lossy(&pages.iter().find(|(n, _)| n == "vmsnap.8").unwrap().1).into_owned();
        assert!(main.contains(".TH vmsnap 8"), "{}", &main[..200.min(main.len())]);
    }

    #[test]
    fn the_config_page_holds_every_line_of_the_reference() {
        let page = config_page();
        assert!(page.starts_with(".TH VMSNAP.TOML 5"));
        for line in REFERENCE.lines().filter(|l| l.contains(" = ")) {
            assert!(page.contains(&line.replace('\\', "\\e")), "missing: {line}");
        }
    }
}
