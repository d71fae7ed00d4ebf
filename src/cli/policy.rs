//! `policy check`: which rule of a policy file allows a request, for audits, offline.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::exit;
use crate::access::authz::{Action, Decision, Policy};
use crate::access::identity::Principal;
use crate::domain::image::{RegistryId, RepositoryName};

/// `ecr-image-service policy …`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Print the rule that allows a request, or that none does; exit 0 if allowed, 6 if denied.
    Check(CheckArgs),
}

/// `ecr-image-service policy check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// The policy file, as the server reads it.
    #[arg(long, env = "ECR_IMAGE_SERVICE_AUTHZ_POLICY")]
    pub authz_policy: PathBuf,
    /// The caller: a SPIFFE ID, a Linkerd identity, or `anonymous`.
    #[arg(long)]
    pub principal: String,
    /// What the caller does.
    #[arg(long, value_enum)]
    pub action: Action,
    /// The repository.
    #[arg(long)]
    pub repository: String,
    /// The registry's 12-digit account ID, for rules that name `registries`. Without it, only
    /// rules without `registries` can allow (as for a service whose account is not known).
    #[arg(long, default_value = "")]
    pub registry_id: String,
}

/// Runs a `policy` subcommand: one line out, and its exit code.
pub fn run(command: PolicyCommand) -> ExitCode {
    let PolicyCommand::Check(args) = command;
    let text = match std::fs::read_to_string(&args.authz_policy) {
        Ok(text) => text,
        Err(err) => {
            eprintln!("ecr-image-service: {}: {err}", args.authz_policy.display());
            return ExitCode::from(exit::NO_INPUT);
        }
    };
    let policy = match Policy::parse(&text) {
        Ok(policy) => policy,
        Err(err) => {
            eprintln!("ecr-image-service: {}: {err}", args.authz_policy.display());
            return ExitCode::from(exit::USAGE);
        }
    };
    let repository = match RepositoryName::parse(&args.repository) {
        Ok(repository) => repository,
        Err(err) => {
            eprintln!("ecr-image-service: --repository: {err}");
            return ExitCode::from(exit::USAGE);
        }
    };
    if !args.registry_id.is_empty() && RegistryId::parse(&args.registry_id).is_err() {
        eprintln!("ecr-image-service: --registry-id: must be a 12-digit AWS account ID");
        return ExitCode::from(exit::USAGE);
    }
    let principal = Principal::named(&args.principal);
    let request = match args.registry_id.as_str() {
        "" => format!("{principal} {} {}", args.action, repository.as_str()),
        account => format!(
            "{principal} {} {account}/{}",
            args.action,
            repository.as_str()
        ),
    };
    match policy.decide(&principal, args.action, &args.registry_id, &repository) {
        Decision::Allow(rule) => {
            println!("allowed: {request}: rule {rule}");
            ExitCode::SUCCESS
        }
        Decision::Deny => {
            println!("denied: {request}: no rule allows it");
            ExitCode::from(exit::DENIED)
        }
    }
}
